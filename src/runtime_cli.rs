//! `kata-runtime` subcommands.
