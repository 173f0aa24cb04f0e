"""cimlab host side: CLI, driver, links, harness, instruments, training, deploy, bench."""
