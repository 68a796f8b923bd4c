"""XLA:CPU workarounds: compile options (`compile_options`) and a convolution whose gradient
avoids XLA:CPU's slow and wrong backward convolutions (`conv`)."""
