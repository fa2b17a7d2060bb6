//! `msae-worker bench` as an example, with mimalloc as the global allocator (as the binaries):
//! `cargo run --release -p msae-worker --example bench -- --path fast --steps 50`.
//! Same arguments as the subcommand; see [`msae_worker::bench`].

use clap::Parser;
use msae_worker::bench::{self, BenchArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Time SAE training steps (same as `msae-worker bench`)")]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    bench::run(&Cli::parse().args)
}
