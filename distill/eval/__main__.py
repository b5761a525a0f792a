"""`python -m distill.eval`: rate a model or a samples file (distill/eval/rate.py)."""

from distill.eval.rate import main

main()
