"""fewstep's shared leaf: what every stage (distill, export, runtime, demo) imports and which imports none of them,
nor torch: user-facing errors, the atomic folder swap, class-label parsing."""
