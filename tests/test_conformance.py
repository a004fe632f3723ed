"""Every built-in format through the conformance suite (tests/conformance.py): each class only
says how to make the format's tensor and what its error bound on a Gaussian weight is (the
measured error, ×1.25). A format whose class is missing here fails `test_every_format_is_tested`."""
import torch
from conformance import ExpertsConformance, FormatConformance
from discq.passes.lowrank import add_lowrank
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.base import FORMATS
from discq.tensors.gguf import GGUFGrid
from discq.tensors.grid import AffineGrid
from discq.tensors.incoherent import IncoherentQuantizedTensor
from discq.tensors.lattice import LatticeQuantizedTensor
from discq.tensors.gptvq import VectorQuantizedTensor
from discq.tensors.qtip import TrellisQuantizedTensor


class TestAffine4BitInputGroups(FormatConformance):
    max_relative_error = 0.10  # measured 0.082

    def make(self, W):
        return AffineQuantizedTensor.from_hp(W, AffineGrid(4, 32))


class TestAffine3BitSymmetricOutputGroups(FormatConformance):
    max_relative_error = 0.23  # measured 0.185

    def make(self, W):
        return AffineQuantizedTensor.from_hp(W, AffineGrid(3, 16, True, "output"))


class TestAffine2BitPerRow(FormatConformance):
    max_relative_error = 0.62  # measured 0.50

    def make(self, W):
        return AffineQuantizedTensor.from_hp(W, AffineGrid(2, None))


class TestAffine8Bit(FormatConformance):
    max_relative_error = 0.007  # measured 0.0054

    def make(self, W):
        return AffineQuantizedTensor.from_hp(W, AffineGrid(8, 64))


class TestAffineLowRankCorrected(FormatConformance):
    max_relative_error = 0.19  # measured 0.153 (3-bit g32 alone: ~0.17)

    def make(self, W):
        return add_lowrank(AffineQuantizedTensor.from_hp(W, AffineGrid(3, 32)), W, 4)


class TestIncoherentAffine(FormatConformance):
    max_relative_error = 0.22  # measured 0.172

    def make(self, W):
        return IncoherentQuantizedTensor.from_hp(W, AffineGrid(3, 32), seed=5)


class TestLatticeE8P2Bit(FormatConformance):
    max_relative_error = 0.40  # measured 0.316

    def make(self, W):
        return LatticeQuantizedTensor.from_hp(W, 2, seed=3)


class TestLatticeE8P3Bit(FormatConformance):
    max_relative_error = 0.22  # measured 0.173

    def make(self, W):
        return LatticeQuantizedTensor.from_hp(W, 3, seed=3)


class TestLatticeE8P4Bit(FormatConformance):
    max_relative_error = 0.12  # measured 0.093

    def make(self, W):
        return LatticeQuantizedTensor.from_hp(W, 4, seed=3)


class TestTrellisHyb2Bit(FormatConformance):
    N = 48  # 16×16 tiles
    max_relative_error = 0.32  # measured 0.267

    def make(self, W):
        return TrellisQuantizedTensor.from_hp(W, 2, "hyb", seed=3)


class TestTrellisHybOwnTable(FormatConformance):
    """A HYB weight whose table fine-tuning changed stores it (the optional `lut`)."""
    N = 48
    max_relative_error = 0.32  # measured 0.267

    def make(self, W):
        from discq.tensors import trellis
        q = TrellisQuantizedTensor.from_hp(W, 2, "hyb", seed=3)
        q.lut = (trellis.hyb_table().float() * 1.01).half()
        return q


class TestTrellis1Mad3Bit(FormatConformance):
    N = 48
    max_relative_error = 0.17  # measured 0.134

    def make(self, W):
        return TrellisQuantizedTensor.from_hp(W, 3, "1mad", seed=3)


class TestVectorCodebook2Bit2D(FormatConformance):
    max_relative_error = 0.42  # measured 0.333

    def make(self, W):
        return VectorQuantizedTensor.from_hp(W, 2, 2, kmeans_iters=10)


class TestVectorCodebook3Bit1DBlockScales(FormatConformance):
    """4-bit block scales (the optional `block_scale`), GPTVQ's loop with H = I."""
    max_relative_error = 0.21  # measured 0.167

    def make(self, W):
        from discq.passes.gptvq import gptvq_config, gptvq_layer
        return gptvq_layer(W, torch.eye(W.shape[1]),
                           gptvq_config(3, 1, group_size=1024, scale_block=16, kmeans_iters=10))


class TestGGUFQ4K(FormatConformance):
    K = 512  # rows of whole 256-weight super-blocks
    max_relative_error = 0.10  # measured 0.075

    def make(self, W):
        return GGUFGrid("Q4_K").quantize(W)


class TestGGUFQ3K(FormatConformance):
    K = 256
    max_relative_error = 0.20  # measured 0.16

    def make(self, W):
        return GGUFGrid("Q3_K").quantize(W)


class TestGGUFQ5_1(FormatConformance):
    max_relative_error = 0.05  # measured 0.039

    def make(self, W):
        return GGUFGrid("Q5_1").quantize(W)


class TestGGUFIQ4XS(FormatConformance):
    K = 512  # a non-linear level table (llama.cpp's i-quant), 256-weight super-blocks
    max_relative_error = 0.10  # measured 0.074

    def make(self, W):
        return GGUFGrid("IQ4_XS").quantize(W)


# every format as the experts of a mixture-of-experts layer (one stacked tensor)
class TestExpertsOfAffine(ExpertsConformance):
    inner, fresh_process = TestAffine4BitInputGroups, True


class TestExpertsOfAffineLowRank(ExpertsConformance):
    inner = TestAffineLowRankCorrected


class TestExpertsOfIncoherentAffine(ExpertsConformance):
    inner = TestIncoherentAffine


class TestExpertsOfLattice(ExpertsConformance):
    inner = TestLatticeE8P3Bit


class TestExpertsOfTrellis(ExpertsConformance):
    inner = TestTrellisHyb2Bit


class TestExpertsOfVectorCodebook(ExpertsConformance):
    inner = TestVectorCodebook2Bit2D


class TestExpertsOfGGUF(ExpertsConformance):
    inner = TestGGUFQ4K


def test_every_format_is_tested():
    classes = [c for c in globals().values() if isinstance(c, type)
               and issubclass(c, FormatConformance) and c is not FormatConformance]
    tested = {type(c().make(torch.randn(c.N, c.K))) for c in classes}
    from discq.tensors.experts import ExpertsQuantizedTensor
    assert tested | {ExpertsQuantizedTensor} == set(FORMATS.values()), \
        "add a FormatConformance subclass for the new format"
    stacked = {type(c.inner().make(torch.randn(c.inner.N, c.inner.K))) for c in
               globals().values() if isinstance(c, type) and issubclass(c, ExpertsConformance)
               and c is not ExpertsConformance}
    assert stacked == tested, "add an ExpertsConformance subclass for the new format"
