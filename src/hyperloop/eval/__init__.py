"""Evaluation: held-out perplexity, the paper's zero-shot tasks with lm-evaluation-harness
semantics, and an lm-eval model adapter (`hyperloop.eval.harness`, imported on demand: it needs
the optional lm-eval package).

    loglik      batched log-likelihood scoring (shared contexts packed once, sorted, bf16 on CUDA)
    perplexity  perplexity over the data helper's non-overlapping windows
    tasks       ARC-E/C, COPA, HellaSwag, LAMBADA, OpenBookQA, PIQA, RACE, SciQ, WinoGrande
    runner      `hyperloop eval`: both of the above for a checkpoint, as a table and JSON
    masks       attention masks through the model's cache hook (packing, padding)
    harness     lm-eval's `--model hyperloop`
"""

from hyperloop.eval.loglik import Request, Score, score
from hyperloop.eval.runner import evaluate, format_table
from hyperloop.eval.tasks import TASKS

# (perplexity() is not re-exported: the name would shadow its module, hyperloop.eval.perplexity.)
__all__ = ["TASKS", "Request", "Score", "evaluate", "format_table", "score"]
