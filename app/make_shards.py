"""Convert a dataset into TFRecord shards in TF Model Garden's layout, for streaming.

Reads any data `app.train` reads (an image folder, CIFAR-10's python batches, a TFDS data
directory, other shards) and writes `train-NNNNN-of-NNNNN`, `validation-...` (held out of
train as a training run would: --validation_split, --seed, stratified) and `test-...`
files of `tf.train.Example`s (`image/encoded` as the images were encoded, CIFAR's pixels as
PNG; `image/class/label`), about 128 MB each, then `shards.json` and `labels.txt`.
A killed conversion leaves no labels.txt, so nothing loads it as a dataset; the same
command continues it. `--index_only` instead counts the records of shards written
elsewhere (TF Model Garden's) and writes their shards.json, so runs need not count them.

Usage (from the repository root):

    python -m app.make_shards --data_dir=~/data/cifar10 --output_dir=~/data/cifar10_shards
    python -m app.make_shards --data_dir=~/data/photos --output_dir=gs://my-bucket/photos \\
        --shards=64 --validation_split=0.05
    python -m app.make_shards --index_only --data_dir=/data/imagenet --label_offset=1
"""

from __future__ import annotations

from absl import flags

from app import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This program's flags, and the data flags (called once, before `cli.run`)."""
    from app import data_flags

    flags.DEFINE_string(
        "output_dir", None, "The folder to write the shards into (new or empty; gs:// works)."
    )
    flags.DEFINE_integer(
        "shards",
        None,
        "Files for the train split (the other splits get files in proportion to their "
        "size); unset: about 128 MB a file.",
        lower_bound=1,
    )
    flags.DEFINE_integer("seed", 0, "Seeds the held-out split and the order of the examples.")
    flags.DEFINE_bool(
        "index_only",
        False,
        "Write only shards.json for the shards already in --data_dir (their record counts), "
        "with --label_offset if given.",
    )
    flags.DEFINE_integer("verbose", 1, "1: a progress bar; 0: none.", lower_bound=0, upper_bound=1)
    data_flags.define_data_flags()
    flags.adopt_module_key_flags(data_flags)


def main(argv: list[str]) -> None:
    from app import data_flags, make_shards_lib
    from common.errors import UsageError

    cli.no_arguments(argv)
    config = data_flags.data_config_from_flags(FLAGS.seed)
    if config.data_dir is None:
        raise UsageError("--data_dir is required: the dataset to convert (or to index)")
    if FLAGS.index_only:
        index = make_shards_lib.write_index(config.data_dir, config.label_offset)
        counts = {s: sum(e["num_examples"]) for s, e in index["splits"].items()}
        print(f"wrote {config.data_dir}/shards.json: {counts}")
        return
    if not FLAGS.output_dir:
        raise UsageError("--output_dir is required: a new folder for the shards")
    index = make_shards_lib.make_shards(
        make_shards_lib.ShardsConfig(config, FLAGS.output_dir, FLAGS.shards, FLAGS.verbose)
    )
    for split, entry in index["splits"].items():
        print(
            f"{split}: {sum(entry['num_examples'])} examples in {len(entry['files'])} files, "
            f"{sum(entry['num_bytes']) / 2**20:.1f} MiB"
        )
    print(f"wrote {FLAGS.output_dir}; train with --data_dir={FLAGS.output_dir}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
