"""Workers: Ray actors that build each candidate in memory and score it with lm-eval.

    messages.py  what crosses between controller and workers (Job, CandidateResult, WorkerSetup, ...; no torch)
    tasks.py     lm-eval task names and splits, checked up front (no torch)
    pool.py      the Ray actors and the ray.wait loop that feeds them (no torch)
    worker.py    CandidateWorker: builds candidates (`evomerge.models.live`) and scores them
    scoring.py   LmEvalScorer: lm-eval over a live model, tasks built once

Workers never write the study (an import-linter contract): results go back to the controller.
"""
