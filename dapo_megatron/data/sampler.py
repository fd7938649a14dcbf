"""Deterministic epoch order: a permutation per (seed, epoch) and a position inside it, resumable."""
import numpy as np


class EpochSampler:
    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        # SeedSequence mixes (seed, epoch) so that seed 1 / epoch 0 and seed 0 / epoch 1 differ.
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()

    def next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.num_items - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_items", self.num_items) != self.num_items:
            raise ValueError(f"data state is for {state['num_items']} prompts but the dataset has "
                             f"{self.num_items}; resume with the same data file and max_prompt_length")
        self.seed = state.get("seed", self.seed)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
