"""Train a small 784-128-10 network on Fashion-MNIST with pykd's kernels.

Every step is built from the public kernels: dense, dense_backward,
cross_entropy and adam_step on one flat parameter buffer.
"""
import time

import numpy as np

import pykd
from pykd.data import load_dataset

ds = load_dataset()
rng = np.random.default_rng(0)
sizes = [ds.n_features, 128, ds.n_classes]

# One flat buffer for all parameters; W and b are views into it.
shapes = [s for a, b in zip(sizes, sizes[1:]) for s in ((a, b), (b,))]
params = np.zeros(sum(int(np.prod(s)) for s in shapes), np.float32)
grads, m, v = (np.zeros_like(params) for _ in range(3))


def views(buf):
    out, start = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(buf[start:start + size].reshape(s))
        start += size
    return out


for (W, b), fan_in in zip(zip(*[iter(views(params))] * 2), sizes):
    bound = 1 / np.sqrt(fan_in)
    W[...] = rng.uniform(-bound, bound, W.shape)
    b[...] = rng.uniform(-bound, bound, b.shape)
W1, b1, W2, b2 = views(params)
dW1, db1, dW2, db2 = views(grads)

step, batch = 0, 64
for epoch in range(2):
    t0 = time.perf_counter()
    order = rng.permutation(len(ds.X_train))
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i:i + batch]
        x, y = ds.X_train[idx], ds.y_train[idx]
        h = pykd.dense(x, W1, b1, "relu")
        z = pykd.dense(h, W2, b2)
        loss, dz = pykd.cross_entropy(z, y)
        dh, dW2[...], db2[...] = pykd.dense_backward(dz, h, W2, z)
        _, dW1[...], db1[...] = pykd.dense_backward(dh, x, W1, h, "relu", need_dx=False)
        step += 1
        pykd.adam_step(params, grads, m, v, step, lr=1e-3)
    h = pykd.dense(ds.X_test, W1, b1, "relu")
    acc = (pykd.dense(h, W2, b2).argmax(1) == ds.y_test).mean()
    print(f"epoch {epoch + 1}: last batch loss {loss:.3f}, test accuracy {acc:.2%}, "
          f"{time.perf_counter() - t0:.1f} s")
