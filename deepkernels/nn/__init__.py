"""Drop-in torch.nn modules built on the deepkernels ops."""
