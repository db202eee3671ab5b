//! One seed's run: the turmoil simulation of the servers and the client, driven step by
//! step, with the plan's faults and endpoint changes applied between steps.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use grpc_pool::discover::Change;
use tokio::sync::mpsc;

use super::client::{self, Changed, Open};
use super::plan::*;
use super::server::{self, ServerCtl};
use super::trace::Journal;

/// Something the driver does at a moment of simulated time.
enum Action {
    Fault {
        server: usize,
        fault: Fault,
        on: bool,
    },
    Discover(Discovery),
    /// Everything back: every server listed, running and reachable.
    HealAll,
}

/// What a run leaves: its journal (trace, ledger, violations).
pub struct Run {
    pub journal: Journal,
}

/// Seeds running now in this process. Two runs of one seed at once (the batch, the
/// regressions and the trace check are tests that run side by side) would build two pools of
/// one name, `sim-<seed>`, which the pool refuses; the name stays the seed's alone, so that
/// it reads the same in every trace of that seed.
static RUNNING: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
static FINISHED: Condvar = Condvar::new();

/// A seed's turn to run; the next run of the same seed waits until it is dropped.
struct SeedRunning(u64);

impl SeedRunning {
    fn wait_for(seed: u64) -> SeedRunning {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while running.contains(&seed) {
            running = FINISHED.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        running.insert(seed);
        SeedRunning(seed)
    }
}

impl Drop for SeedRunning {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
        FINISHED.notify_all();
    }
}

pub fn run(seed: u64) -> Run {
    let _alone = SeedRunning::wait_for(seed);
    let plan = Plan::draw(seed);
    // The pool draws its picks and jitter from fastrand's generator of this thread.
    fastrand::seed(seed);
    let journal = Journal::default();
    journal.at(Duration::ZERO, format!("plan: {plan:?}"));

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(TICK)
        .simulation_duration(HORIZON + Duration::from_secs(10))
        .min_message_latency(plan.latency)
        .max_message_latency(plan.latency)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .build();

    let ctls: Vec<Arc<ServerCtl>> = (0..plan.servers).map(|i| ServerCtl::new(server_name(i))).collect();
    for ctl in &ctls {
        let (ctl, journal) = (ctl.clone(), journal.clone());
        sim.host(ctl.name.clone(), move || server::serve(ctl.clone(), journal.clone()));
    }
    let (changes, changes_rx) = mpsc::unbounded_channel::<Changed>();
    let open = Open::default();
    let shared = Arc::new(plan.clone());
    sim.client("client", client::workload(shared, journal.clone(), open.clone(), changes_rx));

    let mut actions: Vec<(Duration, usize, Action)> = Vec::new();
    for fault in &plan.faults {
        actions.push((
            fault.from,
            actions.len(),
            Action::Fault { server: fault.server, fault: fault.fault, on: true },
        ));
        actions.push((
            fault.until,
            actions.len(),
            Action::Fault { server: fault.server, fault: fault.fault, on: false },
        ));
    }
    for change in &plan.discovery {
        actions.push((change.at, actions.len(), Action::Discover(change.clone())));
    }
    actions.push((HEAL_AT, actions.len(), Action::HealAll));
    actions.sort_by_key(|(at, n, _)| (*at, *n));
    let mut actions = actions.into_iter().peekable();

    let mut listed: Vec<bool> = (0..plan.servers).map(|s| plan.initial.contains(&s)).collect();
    let mut down: Vec<bool> = vec![false; plan.servers];
    // Crashes and restarts wait one tick after the host's connections were closed (see
    // `net::Connections`).
    let mut deferred: Vec<(usize, Host)> = Vec::new();
    loop {
        while let Some((at, _, _)) = actions.peek() {
            if *at > sim.elapsed() {
                break;
            }
            let (_, _, action) = actions.next().expect("peeked");
            let t = sim.elapsed();
            match action {
                Action::Fault { server, fault, on } => {
                    journal.at(
                        t,
                        format!(
                            "fault {} {fault:?} on {}",
                            if on { "starts" } else { "ends" },
                            ctls[server].name
                        ),
                    );
                    if let Some(host) = apply(&sim, &plan, &ctls[server], fault, on, &mut down[server]) {
                        deferred.push((server, host));
                    }
                }
                Action::Discover(change) => {
                    let uri = server_uri(change.server);
                    journal.at(
                        t,
                        format!("discovery {} {uri}", if change.insert { "inserts" } else { "removes" }),
                    );
                    listed[change.server] = change.insert;
                    let change = if change.insert {
                        Change::Insert(change.server, uri)
                    } else {
                        Change::Remove(change.server)
                    };
                    let _ = changes.send(Ok(change));
                }
                Action::HealAll => {
                    journal.at(t, "heal: every server listed, running, healthy and reachable");
                    for (server, ctl) in ctls.iter().enumerate() {
                        if down[server] {
                            ctl.connections.close_all();
                            deferred.push((server, Host::Bounce));
                            down[server] = false;
                        }
                        if !listed[server] {
                            listed[server] = true;
                            let _ = changes.send(Ok(Change::Insert(server, server_uri(server))));
                        }
                    }
                }
            }
        }
        let due = std::mem::take(&mut deferred);
        let stepped = sim.step();
        for (server, host) in due {
            match host {
                Host::Crash => sim.crash(ctls[server].name.as_str()),
                Host::Bounce => sim.bounce(ctls[server].name.as_str()),
            }
        }
        match stepped {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                journal.violation_at(
                    sim.elapsed(),
                    "simulation",
                    format!("the simulation failed at {:?}: {error}", sim.elapsed()),
                );
                break;
            }
        }
        if sim.elapsed() > HORIZON {
            let open = open.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let ids: Vec<u64> = open.keys().copied().collect();
            journal.violation_at(
                sim.elapsed(),
                "every-call-ends",
                format!(
                    "the client had not finished after {HORIZON:?}; calls not ended: {ids:?}; the pool: {}",
                    journal.last_state()
                ),
            );
            for (id, (started, deadline)) in open {
                if let Some(deadline) = deadline {
                    journal.violation_at(
                        sim.elapsed(),
                        "deadline",
                        format!("call {id}, started at {started:?} with a deadline of {deadline:?}, has not ended"),
                    );
                }
            }
            break;
        }
    }
    super::check::ledger(&plan, &journal, sim.elapsed());
    drop(sim);
    Run { journal }
}

/// What the driver does to a host one tick after closing its connections.
#[derive(Clone, Copy)]
enum Host {
    Crash,
    Bounce,
}

/// Starts (`on`) or ends a fault on one server; returns a crash or restart to make a tick
/// later.
fn apply(
    sim: &turmoil::Sim<'_>,
    plan: &Plan,
    ctl: &ServerCtl,
    fault: Fault,
    on: bool,
    down: &mut bool,
) -> Option<Host> {
    let name = ctl.name.as_str();
    match (fault, on) {
        (Fault::Partition, true) => sim.partition("client", name),
        (Fault::PartitionToServer, true) => sim.partition_oneway("client", name),
        (Fault::PartitionToClient, true) => sim.partition_oneway(name, "client"),
        (Fault::Partition | Fault::PartitionToServer | Fault::PartitionToClient, false) => {
            sim.repair("client", name)
        }
        (Fault::Hold, true) => sim.hold("client", name),
        (Fault::Hold, false) => sim.release("client", name),
        (Fault::Crash, true) => {
            ctl.connections.close_all();
            *down = true;
            return Some(Host::Crash);
        }
        (Fault::Shutdown, true) => {
            ctl.shutdown.send_modify(|n| *n += 1);
            *down = true;
        }
        (Fault::Crash | Fault::Shutdown, false) => {
            if *down {
                ctl.connections.close_all();
                *down = false;
                return Some(Host::Bounce);
            }
        }
        (Fault::NotServing, on) => {
            let _ = ctl.serving.send(!on);
        }
        (Fault::Unavailable { pushback_ms }, on) => {
            ctl.pushback_ms.store(if on { pushback_ms } else { 0 }, std::sync::atomic::Ordering::Relaxed);
            ctl.unavailable.store(on, std::sync::atomic::Ordering::Relaxed);
        }
        (Fault::Slow { ms }, on) => {
            ctl.extra_delay_ms.store(if on { ms } else { 0 }, std::sync::atomic::Ordering::Relaxed);
        }
        (Fault::Latency { ms }, on) => {
            let latency = if on { Duration::from_millis(ms) } else { plan.latency };
            sim.set_link_latency("client", name, latency);
        }
    }
    None
}
