"""Starting training runs: torchrun, the DeepSpeed launcher and Slurm (see issue: launch on clusters)."""
