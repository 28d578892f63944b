use super::*;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

fn cfg(mode: Mode) -> ReactorConfig {
    ReactorConfig { mode, idle_threshold: Duration::from_micros(200), pin: false, seccomp: false }
}

fn start(mode: Mode) -> Reactors {
    Reactors::start(&CpuMask::from_cores([0]), cfg(mode)).expect("start reactor")
}

/// Counts its polls; reports Busy while `work` is non-zero.
struct Counter {
    polls: Arc<AtomicUsize>,
    work: Arc<AtomicUsize>,
}

impl Poller for Counter {
    fn poll(&mut self) -> PollStatus {
        self.polls.fetch_add(1, Ordering::Relaxed);
        let w = self.work.load(Ordering::Relaxed);
        if w > 0 {
            self.work.store(w - 1, Ordering::Relaxed);
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
    fn arm(&mut self) -> bool {
        self.work.load(Ordering::Relaxed) > 0
    }
}

/// CPU time (user + system) of one thread, in clock ticks.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("thread stat");
    // Fields after the command name (which ends with ')'): utime is field 14, stime 15 overall.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn call_runs_closure_on_the_reactor_thread_and_returns_its_value() {
    let rs = start(Mode::Adaptive);
    let h = &rs.handles()[0];
    let name = h.call(|r| (r.core(), std::thread::current().name().map(str::to_string))).unwrap();
    assert_eq!(name, (0, Some("reactor_0".to_string())));
}

#[test]
fn messages_wake_a_sleeping_reactor_in_every_mode() {
    for mode in [Mode::Interrupt, Mode::Adaptive, Mode::Poll] {
        let rs = start(mode);
        let h = &rs.handles()[0];
        for i in 0..50 {
            // Give the reactor time to fall asleep between some messages.
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let v = h.call_timeout(Duration::from_secs(5), move |_| i * 2).unwrap();
            assert_eq!(v, i * 2, "mode {mode}");
        }
    }
}

#[test]
fn pollers_run_until_removed_and_come_back_typed() {
    let rs = start(Mode::Poll);
    let h = &rs.handles()[0];
    let polls = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(AtomicUsize::new(0));
    let (p2, w2) = (polls.clone(), work.clone());
    let id = h.call(move |r| r.add_poller(Box::new(Counter { polls: p2, work: w2 }))).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(polls.load(Ordering::Relaxed) > 10, "poll-mode reactor spins its pollers");
    let typed = h.call(move |r| r.poller_mut::<Counter>(id).is_some()).unwrap();
    assert!(typed);
    let removed = h.call(move |r| r.remove_poller(id).is_some()).unwrap();
    assert!(removed);
    let before = polls.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(polls.load(Ordering::Relaxed), before, "a removed poller is not polled");
    let again = h.call(move |r| r.remove_poller(id).is_some()).unwrap();
    assert!(!again, "a stale id finds nothing");
}

#[test]
fn timers_fire_at_their_period_even_while_sleeping() {
    let rs = start(Mode::Interrupt);
    let h = &rs.handles()[0];
    let polls = Arc::new(AtomicUsize::new(0));
    let p2 = polls.clone();
    h.call(move |r| {
        r.add_timer(Box::new(Counter { polls: p2, work: Arc::new(AtomicUsize::new(0)) }), Duration::from_millis(10))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let n = polls.load(Ordering::Relaxed);
    // 300 ms at a 10 ms period is ~30 runs; allow a wide margin for a loaded machine.
    assert!((5..=40).contains(&n), "timer ran {n} times in 300 ms");
}

#[test]
fn arm_reporting_pending_work_keeps_the_reactor_awake() {
    let rs = start(Mode::Interrupt);
    let h = &rs.handles()[0];
    let polls = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(AtomicUsize::new(0));
    let (p2, w2) = (polls.clone(), work.clone());
    h.call(move |r| r.add_poller(Box::new(Counter { polls: p2, work: w2 }))).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let idle_polls = polls.load(Ordering::Relaxed);
    // With nothing to do, an interrupt-mode reactor sleeps: only a handful of polls happen.
    assert!(idle_polls < 10, "interrupt-mode reactor polled {idle_polls} times while idle");
    // Work that appears is picked up once the reactor is woken.
    work.store(1000, Ordering::Relaxed);
    h.call(|_| ()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while work.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(work.load(Ordering::Relaxed), 0, "all work done after one wake-up");
}

#[test]
fn idle_reactor_uses_almost_no_cpu_in_adaptive_and_interrupt_modes() {
    for mode in [Mode::Adaptive, Mode::Interrupt] {
        let rs = start(mode);
        let h = &rs.handles()[0];
        h.call(|r| r.add_poller(Box::new(Counter { polls: Default::default(), work: Default::default() }))).unwrap();
        let tid = h.stats().tid.load(Ordering::Relaxed);
        let t0 = thread_cpu_ticks(tid);
        std::thread::sleep(Duration::from_millis(500));
        let used = thread_cpu_ticks(tid) - t0;
        // Clock ticks are 10 ms; a spinning reactor would use ~50 in 500 ms.
        assert!(used <= 5, "{mode} reactor used {used} ticks while idle");
    }
}

#[test]
fn start_refuses_cores_the_process_cannot_use() {
    let allowed = allowed_cores();
    let missing = (0..MAX_TEST_CORE).find(|c| !allowed.contains(c)).unwrap();
    let err = Reactors::start(&CpuMask::from_cores([missing]), ReactorConfig { pin: true, ..cfg(Mode::Adaptive) })
        .unwrap_err();
    assert!(err.to_string().contains(&format!("core {missing}")), "{err}");
}

const MAX_TEST_CORE: usize = 1024;

#[test]
fn stop_joins_every_thread() {
    let rs = Reactors::start(&CpuMask::from_cores([0, 1]), cfg(Mode::Adaptive)).unwrap();
    let h = rs.handles()[1].clone();
    rs.stop();
    assert!(matches!(h.call(|_| ()), Err(ReactorError::Gone(_))));
}
