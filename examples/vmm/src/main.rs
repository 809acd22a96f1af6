//! `ember`: the example VMM built from the Ember crates.
//!
//! `ember` with no arguments runs the embedded demo guest; `ember --kernel vmlinux`
//! boots a Linux kernel. The exit status is the guest's debug-exit code, 0 after a
//! reset or power-off, and 1 with one `ember: error: ...` line on any failure.

mod api;
mod builder;
mod cli;
mod config;
mod console;
mod control;
mod hint;
mod logger;
mod run;
mod seccomp;
mod snapshot;
mod spawner;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, like every other error: clap's first line without its prefix.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid command line");
            logger::write_stderr(&format!(
                "ember: error: {}\n",
                first.trim_start_matches("error: ")
            ));
            return ExitCode::from(2);
        }
    };
    logger::init(cli.verbose);
    if let Some(diff) = &cli.merge_diff {
        // `--into` is required with it (clap checks).
        let base = cli.into.clone().unwrap_or_default();
        return match snapshot::merge_diff(diff, &base) {
            Ok(bytes) => {
                log::info!(
                    "merged {bytes} bytes of {} into {}",
                    diff.display(),
                    base.display()
                );
                ExitCode::SUCCESS
            }
            Err(message) => {
                logger::write_stderr(&format!("ember: error: {message}\n"));
                ExitCode::FAILURE
            }
        };
    }
    let config = cli.vm_config();

    // Before any thread exists: the filters are compiled here and installed by each
    // thread as it starts (see `seccomp`).
    if !cli.seccomp {
        log::warn!(
            "seccomp filters are off (--seccomp off): every thread may make any system call"
        );
    }
    if let Err(e) = seccomp::init(cli.seccomp) {
        logger::write_stderr(&format!("ember: error: {e}\n"));
        return ExitCode::FAILURE;
    }

    // Before any vCPU thread exists, so that none of them takes SIGINT/SIGTERM.
    let signals = match run::block_termination_signals() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("SIGINT/SIGTERM will end the VMM abruptly: {e}");
            None
        }
    };
    // After the filters are compiled (the API thread installs its own first) and the
    // termination signals are blocked (it must not take them either).
    let api = match &cli.api_sock {
        Some(path) => match api::ApiServer::start(path) {
            Ok(api) => Some(api),
            Err(e) => {
                logger::write_stderr(&format!("ember: error: {e}\n"));
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let requests = api.as_ref().map(|(_, requests)| requests);
    let mut profile = ember_vcpu::ExitProfile::default();
    let vm = if let Some(dir) = &cli.restore {
        control::restore(
            &dir.join(snapshot::STATE_FILE),
            &dir.join(snapshot::MEMORY_FILE),
            &config,
            cli.track_dirty_pages,
            start,
        )
        .map(|vm| (vm, false))
    } else if let (Some(requests), None) = (requests, &cli.kernel) {
        match control::pre_boot(requests, config.clone(), signals.as_ref(), start) {
            Ok(control::Started::Booted(vm)) => Ok((vm, false)),
            Ok(control::Started::Restored { vm, resume }) => Ok((vm, !resume)),
            Ok(control::Started::Signal(signo)) => {
                log::info!("signal {signo} before the VM started");
                return ExitCode::from((128 + signo).clamp(0, 255) as u8);
            }
            Err(message) => Err(message),
        }
    } else {
        builder::build_vm(&config, start)
            .map(|vm| (vm, false))
            .map_err(|e| e.to_string())
    };
    let result = vm.and_then(|(vm, paused)| {
        let boot_done = vm.boot_done.clone();
        let report =
            run::run_vm(vm, signals, &mut profile, requests, paused).map_err(|e| e.to_string())?;
        Ok((report, boot_done))
    });
    if config.exit_stats && profile.vcpus > 0 {
        // The table's first line reads `ember: exit profile: ...`.
        logger::write_stderr(&format!("ember: {profile}"));
    }
    match result {
        Ok((report, boot_done)) => {
            // The boot-done device logs this itself at info level.
            if let (Some(t), true) = (
                boot_done.boot_time(),
                log::max_level() < log::LevelFilter::Info,
            ) {
                logger::write_stderr(&format!(
                    "ember: guest boot done after {:.3} ms\n",
                    t.as_secs_f64() * 1e3
                ));
            }
            log::info!(
                "VM ended: {} (exit code {})",
                report.reason,
                report.exit_code
            );
            let exits: Vec<String> = report
                .exits
                .iter()
                .map(|(k, n)| format!("{} {n}", k.name()))
                .collect();
            log::info!("exits: {}", exits.join(", "));
            log::info!("unclaimed accesses: {}", report.unclaimed);
            ExitCode::from(report.exit_code.clamp(0, 255) as u8)
        }
        Err(message) => {
            logger::write_stderr(&format!("ember: error: {message}\n"));
            ExitCode::FAILURE
        }
    }
}
