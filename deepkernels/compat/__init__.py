"""Entry points with the argument conventions of DeepGEMM, FlashMLA and DeepEP."""
