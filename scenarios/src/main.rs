//! `shoal-sim`: runs Shoal scenarios. The runner arrives with the scenarios
//! issue; until then every command says so and exits non-zero rather than
//! printing results it did not compute.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("shoal-sim {}: deterministic Shoal scenarios", env!("CARGO_PKG_VERSION"));
            println!();
            println!("Usage: shoal-sim <COMMAND>");
            println!();
            println!("Commands run, list and sweep are not yet available in this build.");
            ExitCode::SUCCESS
        }
        Some(command) => {
            let target = args.get(1).map(|t| format!(" {t}")).unwrap_or_default();
            eprintln!("shoal-sim: '{command}{target}' is not yet available: the scenario runner has not landed");
            ExitCode::from(2)
        }
    }
}
