"""Train a small regression model on an IPDC TF cluster with ParameterServerStrategy.

    ipdc tf ipdc/jobs/tf/spec.conf --name demo     # brings the servers up on the swarm
    ipdc tf run demo -- python ipdc/jobs/tf/example.py --steps 100

This script is the chief: it holds a ClusterCoordinator and schedules training
steps on the workers, while the model's variables live on the ps tasks. Keras 3
cannot run ``model.fit`` under this strategy, so the model is a plain
``tf.Module`` and the loop is custom (no tf-keras needed).

The data is synthetic: ``y = x . w + sin(x0)`` with a fixed ``w``. Each step
prints its loss and the worker that ran it; the last line, ``RESULT {json}``,
sums up the run for scripts: loss before and after training on a fixed
evaluation set, steps per worker, the device of every variable, and timings
(steps per second over the timed steps, after ``--warmup`` untimed ones that
trace the step function; seconds from start to the end, TF's import included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

STARTED = time.monotonic()

os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402 - the environment above must be set first

FEATURES = 8
HIDDEN = 16


class Regressor(tf.Module):
    """A one-hidden-layer MLP; created under the strategy's scope, so its variables go to ps."""

    def __init__(self) -> None:
        super().__init__()
        init = tf.random.stateless_normal
        self.w1 = tf.Variable(init([FEATURES, HIDDEN], seed=[1, 1]) * 0.3, name="w1")
        self.b1 = tf.Variable(tf.zeros([HIDDEN]), name="b1")
        self.w2 = tf.Variable(init([HIDDEN, 1], seed=[2, 2]) * 0.3, name="w2")
        self.b2 = tf.Variable(tf.zeros([1]), name="b2")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def target(x: tf.Tensor) -> tf.Tensor:
    w = tf.constant([[1.5], [-2.0], [0.5], [3.0], [-1.0], [0.0], [2.0], [-0.5]])
    return x @ w + tf.sin(x[:, :1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    args = parser.parse_args()

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().as_dict()
    if resolver.task_type != "chief" or not jobs.get("ps") or not jobs.get("worker"):
        sys.exit("example.py runs as the chief of a cluster with ps and worker tasks: run it with "
                 "`ipdc tf run NAME -- python example.py`, which sets TF_CONFIG")
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model = Regressor()

    def loss_of(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.square(model(x) - target(x)))

    @tf.function
    def train_step() -> tuple[tf.Tensor, tf.Tensor]:
        def replica_step() -> tf.Tensor:
            x = tf.random.normal([args.batch, FEATURES])
            with tf.GradientTape() as tape:
                loss = loss_of(x)
            grads = tape.gradient(loss, model.trainable_variables)
            for var, grad in zip(model.trainable_variables, grads, strict=True):
                var.assign_sub(args.lr * grad)
            return loss
        loss = strategy.run(replica_step)
        return loss, tf.distribute.coordinator.experimental_get_current_worker_index()

    @tf.function
    def evaluate() -> tf.Tensor:
        return loss_of(tf.random.stateless_normal([1024, FEATURES], seed=[7, 7]))

    before = float(coordinator.schedule(evaluate).fetch())
    print(f"loss before training: {before:.4f}", flush=True)
    for _ in range(args.warmup):
        coordinator.schedule(train_step)
    coordinator.join()
    timed = time.monotonic()
    scheduled = [coordinator.schedule(train_step) for _ in range(args.steps)]
    coordinator.join()
    train_seconds = time.monotonic() - timed
    per_worker: Counter[int] = Counter()
    for step, remote in enumerate(scheduled, 1):
        loss, worker = remote.fetch()
        per_worker[int(worker)] += 1
        print(f"step {step:4d}  worker {int(worker)}  loss {float(loss):.4f}", flush=True)
    after = float(coordinator.schedule(evaluate).fetch())
    print(f"loss after training:  {after:.4f}", flush=True)
    devices = {v.name: v.device for v in model.trainable_variables}
    print("RESULT " + json.dumps({
        "loss_before": before, "loss_after": after, "steps": args.steps,
        "steps_per_worker": {str(w): n for w, n in sorted(per_worker.items())},
        "variable_devices": devices, "train_seconds": round(train_seconds, 3),
        "steps_per_second": round(args.steps / train_seconds, 1),
        "wall_seconds": round(time.monotonic() - STARTED, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
