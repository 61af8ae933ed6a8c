"""Which rank serves each token-expert choice: the expert's rank, or the replica eval picks.

Without replicas a choice goes to the rank of the expert's only copy. A MoE layer with replicas
applies `eval.metrics.serve_layer`, the one replica rule eval and the cost model use, to the
layer's *global* batch, so that every rank reaches the same decisions and the runtime's routing
equals the prediction (eval/traffic.py):

    1. each rank writes its tokens' row [current rank | k expert ids] into a table of the global
       batch (indexed by (slot, position), the same order on every rank; -1 elsewhere)
    2. one all-reduce (max) of the table: every rank knows every token's experts and rank
       (counted as the `routing` collective, metadata apart from the payload bytes)
    3. serve_layer on the rows present, in (slot, position) order, with home = the token's
       current rank (standard mode: its home rank; coherent: the rank it is on)
    4. each rank keeps the rows of its own tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moeplace.eval.metrics import serve_layer
from moeplace.placement import Placement
from moeplace.serve.dist import Comm


@dataclass
class ExpertMap:
    expert_gpu: torch.Tensor  # int64 [moe_layers, E]: rank of each expert's primary copy
    holders: list[list[list[int]] | None]  # per MoE layer: ranks of each expert's copies; None: no replicas
    gpus_per_node: int
    expert_gpu_host: np.ndarray = field(init=False, repr=False)  # expert_gpu for the replica rule, on the host

    def __post_init__(self) -> None:
        self.expert_gpu_host = self.expert_gpu.cpu().numpy()

    @classmethod
    def from_placement(cls, placement: Placement, device: torch.device) -> "ExpertMap":
        holders = [placement.holders(m) if placement.replicas[m] else None for m in range(placement.num_layers)]
        return cls(torch.tensor(placement.expert_to_gpu, device=device), holders, placement.gpus_per_node)

    def serving(self, comm: Comm, moe: int, ids: torch.Tensor, index: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Rank serving each choice of this rank's tokens, int64 [n, k].

        ids [n, k]: their experts at MoE layer `moe`; index [n]: their rows in the global batch
        of `batch_size` rows (every rank calls this, with the same batch, for every MoE layer).
        """
        holders = self.holders[moe]
        if holders is None:
            return self.expert_gpu[moe][ids]
        table = torch.full((batch_size, 1 + ids.shape[1]), -1, dtype=torch.int64, device=ids.device)
        table[index, 0] = comm.rank
        table[index, 1:] = ids
        # step 2, then one copy to the host (the rule runs there): a single device sync per layer
        rows = comm.max_reduce(table, "routing").cpu().numpy()
        present = rows[:, 0] >= 0
        global_ids = rows[present, 1:]
        served = np.full((batch_size, ids.shape[1]), -1, dtype=np.int64)
        served[present] = serve_layer(holders, global_ids, self.expert_gpu_host[moe][global_ids],  # step 3
                                      rows[present, 0], self.gpus_per_node, comm.world)
        return torch.as_tensor(served, device=ids.device)[index]  # step 4
