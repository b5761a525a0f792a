"""How students are rated: FD and class accuracy in the digits metric classifier's features (metrics.py,
classifier.py), standard FID with a local Inception-v3 (inception.py); `python -m distill.eval` rates an .npz."""
