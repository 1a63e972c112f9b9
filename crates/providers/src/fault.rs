//! A provider wrapper that injects faults, so tests can drive the control
//! plane through the failures real clouds produce: a call failing once or
//! several times, slow calls, "the API said it failed but the VM exists",
//! and machines deleted out of band.
//!
//! Rules can be changed at any time while the provider is in use.
//!
//! ```ignore
//! let faulty = Arc::new(FaultyProvider::new(mock));
//! faulty.fail_nth(Op::Create, 1, ProviderError::retryable("503"));
//! faulty.delay(Op::Get, Duration::from_millis(300));
//! faulty.create_succeeds_but_errors(1);
//! faulty.vanish(&machine_id).await?;
//! assert_eq!(faulty.calls(Op::Create), 2);
//! ```

use crate::{Catalog, CreateRequest, Machine, Provider, ProviderError};
use async_trait::async_trait;
use gpufleet_domain::{ProviderInstanceId, ProviderName};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tracing::debug;

/// A `Provider` operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Create,
    Get,
    Terminate,
    List,
    Catalog,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Create, Op::Get, Op::Terminate, Op::List, Op::Catalog];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Get => "get",
            Op::Terminate => "terminate",
            Op::List => "list",
            Op::Catalog => "catalog",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wraps a provider and injects faults according to rules set at run time.
///
/// A failing call never reaches the inner provider, except with
/// [`create_succeeds_but_errors`](Self::create_succeeds_but_errors).
pub struct FaultyProvider {
    inner: Arc<dyn Provider>,
    calls: [AtomicU64; 5],
    rules: Mutex<Rules>,
}

#[derive(Default)]
struct Rules {
    /// (op, 1-based call number, error)
    nth: Vec<(Op, u64, ProviderError)>,
    /// (op, calls left to fail, error), applied in order
    next: Vec<(Op, u32, ProviderError)>,
    delays: HashMap<Op, Duration>,
    create_then_error: u32,
    vanished: HashSet<ProviderInstanceId>,
}

impl FaultyProvider {
    /// A wrapper with no rules: it behaves exactly like `inner`.
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        Self {
            inner,
            calls: Default::default(),
            rules: Mutex::new(Rules::default()),
        }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &Arc<dyn Provider> {
        &self.inner
    }

    fn rules(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `n`-th call of `op` (1-based, counted since the wrapper was made,
    /// as [`calls`](Self::calls) counts) fails with `err`. A rule for a call
    /// number already passed never fires.
    pub fn fail_nth(&self, op: Op, n: u64, err: ProviderError) {
        self.rules().nth.push((op, n, err));
    }

    /// The next `count` calls of `op` fail with `err`.
    pub fn fail_next(&self, op: Op, count: u32, err: ProviderError) {
        if count > 0 {
            self.rules().next.push((op, count, err));
        }
    }

    /// Every call of `op` waits `delay` before it proceeds (or fails).
    /// `Duration::ZERO` removes the delay.
    pub fn delay(&self, op: Op, delay: Duration) {
        let mut rules = self.rules();
        if delay.is_zero() {
            rules.delays.remove(&op);
        } else {
            rules.delays.insert(op, delay);
        }
    }

    /// The next `count` successful creates really happen, but the caller gets
    /// `Retryable`: the "API said it failed, yet the VM exists" case.
    pub fn create_succeeds_but_errors(&self, count: u32) {
        self.rules().create_then_error += count;
    }

    /// The machine is deleted out of band: terminated underneath, and from
    /// now on `get` says `NotFound`, `list` leaves it out and `terminate` is a
    /// no-op, whatever the inner provider still reports while it shuts down.
    pub async fn vanish(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.inner.terminate(id).await?;
        debug!(machine_id = %id, "machine vanished (injected)");
        self.rules().vanished.insert(id.clone());
        Ok(())
    }

    /// Removes every failure, delay and create-then-error rule. Vanished
    /// machines stay vanished.
    pub fn clear(&self) {
        let mut rules = self.rules();
        rules.nth.clear();
        rules.next.clear();
        rules.delays.clear();
        rules.create_then_error = 0;
    }

    /// How many times `op` was called on the wrapper, failed calls included.
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    fn is_vanished(&self, id: &ProviderInstanceId) -> bool {
        self.rules().vanished.contains(id)
    }

    /// Counts the call, applies a delay, and returns the injected failure if any.
    async fn enter(&self, op: Op) -> Result<(), ProviderError> {
        let n = self.calls[op.index()].fetch_add(1, Ordering::SeqCst) + 1;
        let (delay, fault) = {
            let mut rules = self.rules();
            let delay = rules.delays.get(&op).copied();
            let fault = match rules.nth.iter().position(|(o, at, _)| *o == op && *at == n) {
                Some(i) => Some(rules.nth.remove(i).2),
                None => match rules.next.iter().position(|(o, _, _)| *o == op) {
                    Some(i) => {
                        let rule = &mut rules.next[i];
                        rule.1 -= 1;
                        let err = rule.2.clone();
                        if rule.1 == 0 {
                            rules.next.remove(i);
                        }
                        Some(err)
                    }
                    None => None,
                },
            };
            (delay, fault)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match fault {
            Some(err) => {
                debug!(%op, call = n, error = %err, "injecting provider fault");
                Err(err)
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Provider for FaultyProvider {
    fn name(&self) -> &ProviderName {
        self.inner.name()
    }

    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.enter(Op::Create).await?;
        let machine = self.inner.create(req).await?;
        let lie = {
            let mut rules = self.rules();
            let lie = rules.create_then_error > 0;
            if lie {
                rules.create_then_error -= 1;
            }
            lie
        };
        if lie {
            debug!(machine_id = %machine.id, instance_id = %req.instance_id,
                "machine created, reporting a failure (injected)");
            return Err(ProviderError::retryable(
                "injected fault: the create call failed after the machine was created",
            ));
        }
        Ok(machine)
    }

    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.enter(Op::Get).await?;
        if self.is_vanished(id) {
            return Err(ProviderError::NotFound { id: id.clone() });
        }
        self.inner.get(id).await
    }

    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.enter(Op::Terminate).await?;
        if self.is_vanished(id) {
            return Ok(());
        }
        self.inner.terminate(id).await
    }

    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        self.enter(Op::List).await?;
        let mut machines = self.inner.list(tags).await?;
        let rules = self.rules();
        machines.retain(|m| !rules.vanished.contains(&m.id));
        Ok(machines)
    }

    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        self.enter(Op::Catalog).await?;
        self.inner.catalog().await
    }
    fn machines_on_this_host(&self) -> bool {
        self.inner.machines_on_this_host()
    }
    fn engine(&self) -> Option<gpufleet_proto::EngineSpec> {
        self.inner.engine()
    }
    async fn list_resources(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<crate::Resource>, ProviderError> {
        self.inner.list_resources(tags).await
    }
    async fn delete_resource(&self, resource: &crate::Resource) -> Result<(), ProviderError> {
        self.inner.delete_resource(resource).await
    }
}
