//! `shoal`: the node binary. The daemon and client commands arrive with the
//! node issue; until then it says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("shoal {}: peer-to-peer file sharing node", env!("CARGO_PKG_VERSION"));
            println!();
            println!("Usage: shoal <COMMAND>");
            println!();
            println!("The daemon and client commands (daemon, share, get, cat, search, ls, peers, rm, status)");
            println!("are not yet available in this build.");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("shoal {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("shoal: command '{other}' is not yet available in this build (see `shoal --help`)");
            ExitCode::from(2)
        }
    }
}
