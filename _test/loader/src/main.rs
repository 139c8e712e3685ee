//! `adtrack-loader`: realistic mock ad traffic for adtrack, at a set rate, with a progress bar
//! and a summary at the end. `adtrack-loader --help` lists the options.
//!
//! Exits 1 when events could not be delivered (a non-retriable answer, or out of retries).

use clap::Parser;

use adtrack_loader::run::{run, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    let summary_json = opts.summary_json.clone();
    let summary = run(opts).await?;
    println!("{summary}");
    if let Some(path) = summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary.to_json())?)?;
    }
    if summary.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
