"""One module per quantizer for the quality benchmark. Each has
`quantize(inputs, spec) -> dict` with "tensors" (the weights it changed, as the model now
computes with them, dequantized: {state-dict name: tensor}), "bits" and "numel" (storage bits
of the quantized linears and their weight count, counted as the quantizer stores them: codes at
their width, scales and float zeros at 16 bits, integer zeros at their stored width, codebooks
and sign vectors as stored), "seconds" (its quantization call alone) and "config" (the settings
as passed to it, for anyone to check)."""
