"""`python -m data_prep input='[...]' output_dir=DIR seq_len=L tokenizer.vocab_size=V num_workers=W`."""


def main() -> None:
    # Imported here, not at the top: the encoding workers are spawned processes that import this module
    # (as __mp_main__) but never run main(), so Hydra and the rest of the command stay out of them.
    from common.app import run_app
    from data_prep.config import register_configs
    from data_prep.prepare import prepare

    register_configs()
    run_app("prep", prepare)


if __name__ == "__main__":
    main()
