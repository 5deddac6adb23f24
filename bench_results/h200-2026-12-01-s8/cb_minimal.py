"""Next session's probe: does XLA re-record a command buffer when no buffer moves? A chain of
small kernels whose only input and output is one donated buffer (the weights are the same
array each call): run with TF_CPP_VMODULE=command_buffer_thunk=3 and read 'updated_allocs'."""
import time
import jax, jax.numpy as jnp

w = jnp.eye(256, dtype=jnp.float32) * 0.5
f = jax.jit(lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w) * 0.5 + jnp.sum(x, axis=0) * 1e-3, donate_argnums=1)
x = jnp.ones((16, 256), jnp.float32)
for i in range(12):
    x = f(w, x)
    if i % 4 == 3:
        x.block_until_ready()  # both queued and idle executions
print("minimal chain: done", float(x[0, 0]), flush=True)
