//! `socktap`: the command-line client of socktapd.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stderr = std::io::stderr();
    let cli = match socktap_client::cli::parse(std::env::args_os(), &mut stderr) {
        Ok(cli) => cli,
        Err(code) => return ExitCode::from(code as u8),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(stderr, "socktap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let code = runtime.block_on(socktap_client::cli::run(cli, &mut out, &mut stderr));
    // A closed stdout is not an error for a stream printer (`| head`).
    let _ = out.flush();
    ExitCode::from(code as u8)
}
