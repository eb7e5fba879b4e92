"""medssl: second-stage self-supervised pretraining for medical imaging."""
__version__ = "0.1.0"
