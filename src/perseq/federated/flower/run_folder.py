"""The ServerApp's run folder: the same files as the simulator's, written as the same
atomic sets, so ``perseq evaluate`` reads a Flower run like any other and a killed
ServerApp resumes from its last finished round.

  config.json, vocab/        ``write_run_files`` (the item catalogue; "engine": "flower")
  model.safetensors          the global weights of the best round (validation)
  last.safetensors           the global weights after the last finished round
  server_state.safetensors   the server optimizer's buffers
  trainer_state.json         round, best, patience counter, per-round history
  results.json               at the end: federated validation and test of the best round

No personal parameters: they never reach the server (each node keeps its own, see
``task.PersonalStore``), so unlike a simulator folder this one has no personal.safetensors,
and ``perseq evaluate`` on it scores every user with the initial personal parameters.
Imports no Flower.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...checkpoint import commit, json_writer, read_json, read_run_file, recover, tensors_writer, write_results, write_run_files
from ...report import hardware_name
from ...train import check_same_run, prepare_run_folder
from ..client import SENT_METADATA
from ..privacy import PrivacyLedger
from ..strategies import ServerOptConfig, ServerOptimizer


@dataclass
class RoundState:
    """trainer_state.json (the simulator's keys)."""

    round: int = 0  # finished rounds
    best: float = -math.inf  # the best validation metric so far
    best_round: int = 0  # 1-based; 0 = none yet
    bad: int = 0  # evaluations without improvement since the best
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    server_steps: int = 0


class ServerRun:
    """The server side of one run: the global weights, the server optimizer, the best
    round and the folder they are saved in (``out`` None: nothing is saved)."""

    def __init__(self, cfg, setup, out: Path | None, *, resume: bool = False, overwrite: bool = False,
                 extra_meta: dict | None = None, log=print):
        fc = cfg.federated
        self.cfg, self.setup, self.out, self.log = cfg, setup, out, log
        self.server = ServerOptimizer(ServerOptConfig(kind=fc.server_optimizer, lr=fc.server_lr,
                                                      momentum=fc.server_momentum))
        self.state = RoundState()
        self.global_ = {k: v.clone() for k, v in setup.init_state.items()}
        self.best_weights = {k: v.clone() for k, v in self.global_.items()}
        # Flower's DP wrapper samples a fixed number of clients, not Poisson: no amplification
        # by sampling is claimed (q = 1), an upper bound on the ε of the rounds actually run
        self.ledger = PrivacyLedger(noise_multiplier=fc.dp_noise, sample_rate=1.0, delta=fc.dp_delta) \
            if fc.dp_clip is not None else None
        self._t0 = time.perf_counter()
        if out is None:
            return
        prepare_run_folder(out, resume, overwrite, log)
        if resume:
            recover(out)
            if (out / "config.json").exists():
                check_same_run(out, cfg, setup.model)  # another config's rounds would mix two experiments
            if (out / "trainer_state.json").exists():
                saved = read_json(out, "trainer_state.json")
                self.state = RoundState(**{k: saved[k] for k in (f.name for f in dataclasses.fields(RoundState))
                                           if k in saved})
                self.global_ = read_run_file(out, "last.safetensors", lambda p: load_file(str(p)))
                srv = read_run_file(out, "server_state.safetensors", lambda p: load_file(str(p)))
                self.server.load_state_dict({"tensors": srv, "steps": self.state.server_steps})
                self.best_weights = read_run_file(out, "model.safetensors", lambda p: load_file(str(p)))
                if self.ledger is not None:
                    self.ledger.record(self.state.round)
                log(f"resumed from {out} at round {self.state.round}")
        write_run_files(out, cfg, setup.model, setup.split.data, {**(extra_meta or {}), "engine": "flower"})

    # ------------------------------------------------------------------ the rounds
    @property
    def shared(self) -> dict[str, torch.Tensor]:
        return {n: self.global_[n] for n in self.setup.shared}

    @property
    def stopped(self) -> bool:
        """Patience ran out: no more training rounds."""
        return self.state.bad >= self.cfg.federated.patience

    def keep_upto(self) -> int:
        """The best round so far, 0-based (-1: none): clients keep their personal state as of it."""
        return self.state.best_round - 1

    def end_round(self, round_: int, new_shared: dict[str, torch.Tensor] | None, report, valid: dict | None) -> None:
        """Record 0-based round ``round_`` (its new global shared weights, None if no update
        arrived; the strategy's RoundReport; the aggregated validation or None) and commit
        it, with the best weights when it improved on validation."""
        secs = time.perf_counter() - self._t0
        self._t0 = time.perf_counter()
        st, metric = self.state, self.cfg.eval.metric
        if new_shared is not None:
            self.global_ = {**self.global_, **{n: t.to(self.global_[n].device) for n, t in new_shared.items()}}
        sent = sum(t.numel() * 4 for t in self.shared.values())  # float32 each way
        rec = {"round": round_ + 1, "sampled": report.sampled, "reported": report.reported, "failures": report.failures,
               "seconds": secs, "bytes_down_per_client": sent, "bytes_up_per_client": sent + 8 * len(SENT_METADATA)}
        if report.loss is not None:
            rec["loss"] = report.loss
        if self.ledger is not None and new_shared is not None:
            self.ledger.record(1)
            rec["epsilon"] = self.ledger.epsilon()
        improved = False
        if valid is not None:
            rec["valid"] = {k: v for k, v in valid.items() if k != "n_users"}
            if valid[metric] > st.best:
                st.best, st.best_round, st.bad, improved = valid[metric], round_ + 1, 0, True
                self.best_weights = {k: v.clone() for k, v in self.global_.items()}
            else:
                st.bad += 1
        st.history.append(rec)
        st.round, st.train_seconds = round_ + 1, st.train_seconds + secs
        st.server_steps = self.server.state_dict()["steps"]
        shown = f"valid {metric} {valid[metric]:.4f}  best {st.best:.4f}@{st.best_round}  " if valid else ""
        self.log(f"round {round_ + 1}: {report.reported}/{report.sampled} clients  "
                 f"loss {rec.get('loss', float('nan')):.4f}  {shown}{secs:.1f}s")
        if self.out is None:
            return
        files = {"last.safetensors": tensors_writer(self.global_),
                 "server_state.safetensors": tensors_writer(self.server.state_dict()["tensors"]),
                 "trainer_state.json": json_writer(dataclasses.asdict(st))}
        if improved or not (self.out / "model.safetensors").exists():
            files["model.safetensors"] = tensors_writer(self.best_weights)
        commit(self.out, files)

    # ---------------------------------------------------------------------- the end
    def finish(self, valid: dict | None, test: dict | None, method: str) -> dict:
        """results.json: the federated validation and test of the best round."""
        fc, st = self.cfg.federated, self.state
        n_active = len(self.setup.active())
        per_round = n_active if fc.clients_per_round == 0 else min(fc.clients_per_round, n_active)
        sent = sum(t.numel() * 4 for t in self.shared.values())
        result = {
            "model": method,
            "engine": "flower",
            "dataset": self.cfg.data.dataset,
            "seed": self.cfg.train.seed,
            "best_epoch": st.best_round,
            "best_round": st.best_round,
            "epochs": st.round,
            "valid": valid,
            "test": test,
            "epoch_seconds": st.train_seconds / max(st.round, 1),
            "federated": {"clients": self.setup.n_clients, "clients_per_round": per_round, "rounds": st.round,
                          "local_epochs": fc.local_epochs,
                          "passes": st.round * fc.local_epochs * per_round / max(n_active, 1),
                          "bytes_per_client_per_round": {"down": sent, "up": sent + 8 * len(SENT_METADATA)},
                          "sent_metadata": list(SENT_METADATA),
                          **({"privacy": self.ledger.to_dict()} if self.ledger is not None else {})},
            "hardware": hardware_name(self.setup.device),
            "history": st.history,
        }
        if self.out is not None:
            write_results(self.out, result)
        return result

