"""The torch-free core shared by every stage: the model spec, image decoding, model packages and runtimes."""
