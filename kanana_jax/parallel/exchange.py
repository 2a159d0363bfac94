"""Ragged all-to-all of rows between the devices of one mesh axis, inside `shard_map`.

`ragged_exchange` has the semantics of `jax.lax.ragged_all_to_all`: this device sends rows
[input_offsets[j], input_offsets[j] + send_sizes[j]) of `operand` to device j, where they land at rows
[output_offsets[j], ...) of j's output; it receives recv_sizes[i] rows from device i. Rows of the output that
nothing lands on are zero. Two implementations:
  'ragged': `jax.lax.ragged_all_to_all` (TPU, GPU): moves exactly the rows that are sent.
  'dense':  a padded `jax.lax.all_to_all` of [G, max_send, ...] blocks plus the senders' output offsets. XLA:CPU
            has no ragged-all-to-all, so this is what runs on CPU (tests, fake devices); it moves G*max_send rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EXCHANGES = ("ragged", "dense")


def exchange_for_platform(platform: str) -> str:
    """'ragged' where XLA implements ragged-all-to-all (TPU, GPU), else 'dense'."""
    return "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "dense"


def ragged_exchange(operand_MxD, out_rows: int, input_offsets_G, send_sizes_G, output_offsets_G, recv_sizes_G, *,
                    axis_name: str, exchange: str, max_send: int):
    """Sends ragged row blocks along `axis_name` -> [out_rows, D...]. `max_send` bounds every send_sizes[j]."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}; allowed values: {EXCHANGES}")
    i32 = jnp.int32
    input_offsets_G, send_sizes_G, output_offsets_G, recv_sizes_G = (
        a.astype(i32) for a in (input_offsets_G, send_sizes_G, output_offsets_G, recv_sizes_G))
    output = jnp.zeros((out_rows,) + operand_MxD.shape[1:], operand_MxD.dtype)
    if exchange == "ragged":
        return jax.lax.ragged_all_to_all(operand_MxD, output, input_offsets_G, send_sizes_G, output_offsets_G,
                                         recv_sizes_G, axis_name=axis_name)
    G = send_sizes_G.shape[0]
    rows_C = jnp.arange(max_send, dtype=i32)
    src_GxC = input_offsets_G[:, None] + rows_C[None, :]
    send_ok_GxC = rows_C[None, :] < send_sizes_G[:, None]
    src_GxC = jnp.clip(src_GxC, 0, operand_MxD.shape[0] - 1)
    blocks = jnp.take(operand_MxD, src_GxC.reshape(-1), axis=0).reshape((G, max_send) + operand_MxD.shape[1:])
    mask = send_ok_GxC.reshape(send_ok_GxC.shape + (1,) * (operand_MxD.ndim - 1))
    blocks = jnp.where(mask, blocks, jnp.zeros((), blocks.dtype))
    recv_blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0)            # [G_src, max_send, D...]
    dest_base_G = jax.lax.all_to_all(output_offsets_G, axis_name, 0, 0)  # where each sender put my rows
    dest_GxC = dest_base_G[:, None] + rows_C[None, :]
    dest_GxC = jnp.where(rows_C[None, :] < recv_sizes_G[:, None], dest_GxC, out_rows)
    flat = recv_blocks.reshape((G * max_send,) + operand_MxD.shape[1:])
    return output.at[dest_GxC.reshape(-1)].set(flat, mode="drop")
