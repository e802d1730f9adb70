"""Finding the best merge: in-memory candidates, model soups, sweeps with Pareto fronts, and search.

    candidate.py  a recipe merged into one preallocated model (merge_in_memory, CandidateEvaluator)
    fastpath.py   what candidates share: skipped unchanged tensors, kernels' `into` straight into
                  the model, their prepared state (TIES's magnitude orders) kept per search
    space.py      recipe field paths, grids, and `{search: [lo, hi]}` ranges
    soup.py       uniform and greedy soups (Wortsman et al., 2022)
    sweep.py      grid sweeps of recipe fields, the Pareto front (rewarded soups)
    pareto.py     objectives and the Pareto front
    optimize.py   CMA-ES / TPE / NSGA-II through optuna, resumable and fault tolerant
    report.py     progress bar, tables, PNG plots, atomic files
    adamerging/   AdaMerging: lambda learned by entropy minimisation on unlabelled inputs

Nothing is imported here, so `import mergelab.search` stays cheap.
"""
