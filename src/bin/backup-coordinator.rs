//! `backup-coordinator`: the operator's command line (docs/C_API.md §11).

fn main() -> std::process::ExitCode {
    backup_coordinator::cli::main()
}
