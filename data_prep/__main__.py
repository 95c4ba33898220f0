"""`python -m data_prep input='[...]' output_dir=DIR seq_len=L tokenizer.vocab_size=V num_workers=W`."""

from common.app import run_app
from data_prep.config import register_configs
from data_prep.prepare import prepare


def main() -> None:
    register_configs()
    run_app("prep", prepare)


if __name__ == "__main__":
    main()
