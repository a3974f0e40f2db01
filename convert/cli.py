"""`cwm-convert`: streaming conversion between transformers safetensors, native PyTorch DCP and Orbax.

    cwm-convert hf-to-orbax SRC DST [--dtype bfloat16|float32] [--quantize 8|4 [--group-size N] [--keep-head]]
                [--compression zstd|none] [--overwrite]
    cwm-convert orbax-to-hf SRC DST [--max-shard-size 5GB] [--overwrite]
    cwm-convert dcp-to-orbax SRC DST [--dtype bfloat16|float32] [--compression zstd|none] [--overwrite]
    cwm-convert train-to-orbax WORKDIR DST [--step N] [--dtype bfloat16|float32] [--compression zstd|none]
                [--overwrite]
    cwm-convert quantize SRC DST --bits 8|4 [--group-size N] [--keep-head] [--scale-dtype bfloat16|float32]
                [--compression zstd|none] [--overwrite]

Each reads one tensor at a time (a background thread reads ahead while the writer works, under a byte budget:
`checkpoint.read_ahead`), so host memory stays a small multiple of the largest tensor; the output appears only when
complete. Known errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

# Files a converted checkpoint carries along from its source (tokenizer, sampling defaults, native params).
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "params.json",
)
DTYPES = ("bfloat16", "float32")
COMPRESSIONS = ("zstd", "none")
# int4 without a group size loses too much (cwm_jax.quant); 128 is the common choice and divides every 32B width.
DEFAULT_INT4_GROUP = 128


class ConvertError(Exception):
    """A known failure: printed as one line, exit status 2."""


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1234' -> 1234 bytes (transformers' convention)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * powers[unit])


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started its program.

    VmHWM, where Linux has it: ru_maxrss also counts what a parent held when it forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Progress:
    """A bytes-per-second progress bar (tqdm, on stderr) and the closing summary line."""

    def __init__(self, total_bytes: int, description: str, quiet: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=description, disable=quiet, file=sys.stderr)
        self.tensors = 0
        self.bytes = 0
        self.start = time.perf_counter()

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        self.bar.update(nbytes)

    def summary(self, dst: str) -> str:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        rate = self.bytes / max(seconds, 1e-9) / 1e6
        return (
            f"wrote {dst}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {seconds:.1f} s "
            f"({rate:.0f} MB/s), peak RSS {peak_rss_bytes() / 1e9:.2f} GB"
        )


def _carried(src: str) -> list[str]:
    return [os.path.join(src, f) for f in CARRIED_FILES if os.path.isfile(os.path.join(src, f))]


def _summary(progress: Progress, dst: str, qc) -> str:
    """The summary line, naming the quantization when there is one."""
    return progress.summary(dst) + ("" if qc is None else f", {qc.describe()}")


def _model_bytes(config, dtype: str) -> int:
    """Bytes of every tensor of a model of `config` stored in `dtype` (a progress bar's total)."""
    from cwm_jax.hf import hf_layout, numpy_dtype

    count = sum(int(np.prod(shape)) for _, shape, _, _ in hf_layout(config).values())
    return count * np.dtype(numpy_dtype(dtype)).itemsize


def _checkpoint_bytes(config, qc) -> int:
    """Bytes of every leaf of a converted checkpoint of `config` quantized by `qc`, as numpy holds them."""
    import jax.numpy as jnp

    from cwm_jax import checkpoint

    specs = checkpoint.leaf_specs(config, qc).values()
    return sum(int(np.prod(shape)) * jnp.dtype(dtype).itemsize for shape, dtype in specs)


def quant_from_flags(
    bits: int, group_size: int | None = None, keep_head: bool = False, scale_dtype: str | None = None, flag="--bits"
):
    """The `cwm_jax.quant.QuantConfig` of the command-line flags (`flag` names the bits flag in errors): int8 per
    output channel unless `group_size`, int4 in groups of `group_size` (default 128); the head too unless
    `keep_head`."""
    from cwm_jax import quant

    if bits not in (8, 4):
        raise ConvertError(f"{flag} must be 8 or 4, got {bits}")
    if group_size is not None and group_size < 1:
        raise ConvertError(f"--group-size must be a positive integer, got {group_size}")
    if bits == 4 and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    scale_dtype = scale_dtype or "bfloat16"
    return quant.QuantConfig(bits=bits, group_size=group_size, head=not keep_head, scale_dtype=scale_dtype)


def _cast(tensors: Iterator, dtype: str, progress: Progress) -> Iterable[tuple[tuple[str, ...], np.ndarray]]:
    """(canonical path, array in `dtype`) per source tensor, counting source bytes read."""
    from cwm_jax.hf import numpy_dtype

    target = numpy_dtype(dtype)
    for t, array in tensors:
        out = array.astype(target, copy=False)  # any memory order: Orbax copies into its chunks
        del array
        progress.update(t.nbytes)
        yield t.path, out


def _read_ahead(pairs: Iterator, sizes: list[int]) -> Iterator:
    """`checkpoint.read_ahead` of a source's tensors (`sizes`: their bytes as read, in order), up to the largest
    tensor plus half an Orbax batch alive: the writer's batch and the next tensors overlap, the two largest tensors
    never (TensorStore holds its own copy of the batch it writes, so memory is about twice what is alive)."""
    from cwm_jax import checkpoint

    return checkpoint.read_ahead(pairs, max(sizes, default=0) + checkpoint.BATCH_BYTES // 2, sizes=sizes)


def hf_to_orbax(
    src: str,
    dst: str,
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    quant_config=None,
    compression: bool = True,
) -> str:
    """Convert a transformers CWM folder to an Orbax checkpoint; returns the summary line.

    With `quant_config` (a `cwm_jax.quant.QuantConfig`) each weight it names is quantized as it streams by (from the
    `dtype` cast), so the result is the quantized checkpoint that `quantize` would make of the float one. Kernels go
    to Orbax as transposed views of the bytes read: TensorStore's copy into its chunks does the transpose."""
    from cwm_jax import checkpoint, hf, quant
    from cwm_jax.config import CwmConfig

    config = CwmConfig.from_hf(src)
    stored = hf.stored_dtype(src)
    tensors = hf.scan_hf_checkpoint(src, config, dtype=stored if stored in hf.SAFETENSORS_DTYPES.values() else None)
    target = dtype or (stored if stored in DTYPES else "bfloat16")
    config = dataclasses.replace(config, dtype=target, param_dtype=target)
    if quant_config is not None:
        quant.check_config(config, quant_config)
    progress = Progress(sum(t.nbytes for t in tensors), "hf-to-orbax", quiet)
    leaves = _cast(_read_ahead(hf.iter_hf_tensors(tensors, views=True), [t.nbytes for t in tensors]), target, progress)
    if quant_config is not None:
        leaves = quant.quantize_leaves(leaves, quant_config)
    checkpoint.save_streaming(
        dst,
        config,
        leaves,
        files=_carried(src),
        overwrite=overwrite,
        quant_config=quant_config,
        compression=compression,
    )
    return _summary(progress, dst, quant_config)


def dcp_to_orbax(
    src: str, dst: str, dtype: str | None = None, overwrite: bool = False, quiet: bool = False, compression: bool = True
) -> str:
    """Convert the native release format (params.json + *.distcp) to an Orbax checkpoint; returns the summary."""
    from cwm_jax import checkpoint
    from cwm_jax.convert import dcp

    config = dcp.read_params_json(src)
    tensors = dcp.scan_dcp(src, config)
    target = dtype or config.param_dtype
    config = dataclasses.replace(config, dtype=target, param_dtype=target)
    progress = Progress(sum(t.nbytes for t in tensors), "dcp-to-orbax", quiet)
    leaves = _cast(_read_ahead(dcp.iter_dcp_tensors(src, tensors), [t.nbytes for t in tensors]), target, progress)
    checkpoint.save_streaming(dst, config, leaves, files=_carried(src), overwrite=overwrite, compression=compression)
    return progress.summary(dst)


def train_to_orbax(
    src: str,
    dst: str,
    dtype: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    compression: bool = True,
) -> str:
    """A training workdir's trained model (latest step, or `step`) -> a converted checkpoint; returns the summary."""
    from cwm_jax.train import export
    from cwm_jax.train.config import model_config

    run = export.run_config_of(src, step)
    config = model_config(run)
    progress = Progress(_model_bytes(config, dtype or run.dtype), "train-to-orbax", quiet)
    export.export(
        src,
        dst,
        step=step,
        dtype=dtype,
        overwrite=overwrite,
        on_leaf=lambda path, n: progress.update(n),
        compression=compression,
    )
    return progress.summary(dst)


def quantize(src: str, dst: str, qc, overwrite: bool = False, quiet: bool = False, compression: bool = True) -> str:
    """Quantize a float Orbax checkpoint by `qc` (a `cwm_jax.quant.QuantConfig`), one leaf at a time; returns the
    summary line. Everything is checked (SRC not already quantized, the group size against every weight) before
    anything is written."""
    from cwm_jax import checkpoint, quant

    existing = quant.read(src)
    if existing is not None:
        raise ConvertError(
            f"{src} is already quantized ({existing.describe()}, {quant.QUANT_FILE}); quantize its float checkpoint"
        )
    config = checkpoint.read_config(src)
    quant.check_config(config, qc)
    progress = Progress(_checkpoint_bytes(config, qc), "quantize", quiet)
    checkpoint.save_streaming(
        dst,
        config,
        quant.quantize_leaves(checkpoint.read_ahead(checkpoint.iter_leaves(src)), qc),
        files=_carried(src),
        overwrite=overwrite,
        quant_config=qc,
        on_leaf=lambda path, nbytes: progress.update(nbytes),
        compression=compression,
    )
    return _summary(progress, dst, qc)


def orbax_to_hf(
    src: str, dst: str, max_shard_size: int = 5 * 10**9, overwrite: bool = False, quiet: bool = False
) -> str:
    """Convert an Orbax checkpoint to sharded safetensors that `CwmForCausalLM.from_pretrained` loads."""
    from cwm_jax import checkpoint, hf, quant

    config = checkpoint.read_config(src)
    qc = quant.read(src)
    if qc is not None:
        raise ConvertError(
            f"{src} is quantized ({qc.describe()}, {quant.QUANT_FILE}); transformers' CwmForCausalLM has no such "
            "format: convert the float checkpoint it was made from"
        )
    progress = Progress(_model_bytes(config, config.param_dtype), "orbax-to-hf", quiet)

    def write(folder: str) -> None:
        hf.write_hf_streaming(
            folder,
            config,
            checkpoint.read_ahead(checkpoint.iter_leaves(src)),
            max_shard_bytes=max_shard_size,
            on_tensor=lambda name, nbytes: progress.update(nbytes),
        )
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        for path in _carried(src):
            shutil.copy2(path, folder)

    checkpoint.write_atomically(dst, write, overwrite=overwrite)
    return progress.summary(dst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cwm-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("hf-to-orbax", "transformers folder (config.json + safetensors) -> Orbax checkpoint"),
        ("dcp-to-orbax", "native release folder (params.json + *.distcp) -> Orbax checkpoint"),
        ("orbax-to-hf", "Orbax checkpoint -> transformers folder (sharded safetensors + index + config.json)"),
        ("train-to-orbax", "training workdir (train.py --workdir) -> Orbax checkpoint of its trained model"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--overwrite", action="store_true", help="replace DST (only once the new output is complete)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name.endswith("to-orbax"):
            p.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the source's, bfloat16 if unknown)")
            _compression_flag(p)
        if name == "train-to-orbax":
            p.add_argument("--step", type=int, help="training step to export (default: the latest complete one)")
        elif name == "orbax-to-hf":
            p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest safetensors file")
        if name == "hf-to-orbax":
            p.add_argument(
                "--quantize",
                type=int,
                metavar="8|4",
                help="write a quantized checkpoint in the same pass (as `quantize --bits`; no float one in between)",
            )
            _quant_flags(p)
    help_text = "float Orbax checkpoint -> weight-only int8 / int4 Orbax checkpoint (cwm_jax.quant)"
    p = sub.add_parser("quantize", help=help_text, description=help_text)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--bits",
        type=int,
        required=True,
        metavar="8|4",
        help="8: int8, one scale per output channel (or per --group-size); 4: int4 in groups of --group-size",
    )
    _quant_flags(p)
    _compression_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace DST (only once the new output is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _compression_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="zstd",
        help="zstd (default): about 20%% smaller for bf16 weights; none: a faster conversion where cores are few "
        "(1.3-1.7x on a 2-core host, BENCHMARKS.md)",
    )


def _quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-size",
        type=int,
        help=f"input-dim group of one scale; must divide every quantized weight's input width "
        f"(default: {DEFAULT_INT4_GROUP} for int4, per output channel for int8)",
    )
    p.add_argument("--keep-head", action="store_true", help="leave the output head unquantized")
    p.add_argument("--scale-dtype", choices=DTYPES, help="storage dtype of the scales (default: bfloat16)")


def main(argv: list[str] | None = None) -> int:
    from cwm_jax.config import ConfigError
    from cwm_jax.hf import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        # Checked before any reading; the writers check again when they commit.
        if os.path.exists(args.dst) and not args.overwrite:
            raise ConvertError(f"{args.dst} already exists; pass --overwrite to replace it")
        compress = getattr(args, "compression", "zstd") == "zstd"
        if args.command == "quantize":
            qc = quant_from_flags(args.bits, args.group_size, args.keep_head, args.scale_dtype)
            line = quantize(args.src, args.dst, qc, args.overwrite, args.quiet, compress)
        elif args.command == "hf-to-orbax":
            qc = None
            if args.quantize is not None:
                qc = quant_from_flags(args.quantize, args.group_size, args.keep_head, args.scale_dtype, "--quantize")
            elif args.group_size is not None or args.keep_head or args.scale_dtype is not None:
                raise ConvertError("--group-size, --keep-head and --scale-dtype apply only with --quantize 8|4")
            line = hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite, args.quiet, qc, compress)
        elif args.command == "dcp-to-orbax":
            line = dcp_to_orbax(args.src, args.dst, args.dtype, args.overwrite, args.quiet, compress)
        elif args.command == "train-to-orbax":
            line = train_to_orbax(args.src, args.dst, args.dtype, args.step, args.overwrite, args.quiet, compress)
        else:
            line = orbax_to_hf(args.src, args.dst, args.max_shard_size, args.overwrite, args.quiet)
    except (ConfigError, CheckpointError, ConvertError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"cwm-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
