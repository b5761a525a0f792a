"""Research and benchmark scripts over fewstep's public API, outside the installed packages: each writes where its
--out says (the results in docs/ name their command). Run from the repository root, e.g.
`python -m benchmarks.compare_students BUNDLE ... --seeds 1,2,3 --out results/students`."""
