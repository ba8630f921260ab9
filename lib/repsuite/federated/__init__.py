"""A federated-learning simulator: data partitions, participation schedules, clients' local SGD
vectorized over clients (torch.func), a generic server loop, robust aggregation rules and
Byzantine attacks. Paper-specific algorithms live in their own modules beside these."""

from repsuite.federated import aggregators, attacks, participation, partition
from repsuite.federated.aggregators import (
    as_rule,
    bulyan,
    coordinate_median,
    fedavg,
    fedavg_aggregate,
    geometric_median,
    krum,
    multi_krum,
    trimmed_mean,
)
from repsuite.federated.clients import (
    BatchSampler,
    Clients,
    bench_round,
    cross_entropy,
    evaluate,
    flatten,
    flatten_stack,
    gradients,
    local_sgd,
    local_sgd_loop,
    params_of,
    unflatten,
)
from repsuite.federated.server import History, client_deltas, run

__all__ = [
    "BatchSampler", "Clients", "History", "aggregators", "as_rule", "attacks", "bench_round",
    "bulyan", "client_deltas", "coordinate_median", "cross_entropy", "evaluate", "fedavg",
    "fedavg_aggregate", "flatten", "flatten_stack", "geometric_median", "gradients", "krum",
    "local_sgd", "local_sgd_loop", "multi_krum", "params_of", "participation", "partition", "run",
    "trimmed_mean", "unflatten",
]
