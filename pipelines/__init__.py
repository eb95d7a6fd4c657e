"""The `kava` command line, experiment configs (``configs/*.yaml``), the end-to-end runner and its report."""
