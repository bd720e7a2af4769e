"""The controller: prepare a search, then ask, dispatch, score and tell (no torch in this process).

    prepare.py      every input checked before the study is written or Ray starts
    run.py          the search loop, resume, held-out scoring; the study's only writer
    controllers.py  evomerge's own optimizers (pycma CMA-ES, random) behind ask/tell, with lookahead
    samplers.py     Optuna samplers (TPE, GP, NSGA-II, ...) for studies without generations
    spaces/         genes and their decoding into recipes
"""

from evomerge.search.prepare import Prepared, materialize_trial_models, prepare, task_specs
from evomerge.search.run import SearchRun, SearchSummary, resume_search, run_search

__all__ = ["Prepared", "SearchRun", "SearchSummary", "materialize_trial_models", "prepare", "resume_search",
           "run_search", "task_specs"]
