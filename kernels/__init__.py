"""pyfuse's Triton kernels (installed as ``pyfuse.kernels``). Each module lists its kernels in
``AOT_SPECS`` so that tests/test_triton_aot.py can compile them for sm_80 / sm_90 without a GPU."""
