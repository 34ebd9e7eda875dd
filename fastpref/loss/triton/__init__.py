"""The Triton backend: the kernels (``kernels``) and their launch code and custom ops (``ops``)."""
