//! The immutable runtime view of the configuration and its atomic holder.
//!
//! A [`Snapshot`] contains everything a request needs to route and balance:
//! the route table, each route's pools with their weights, each pool's
//! backends with references to their live health. Each request loads one
//! snapshot at its start and uses only it, so a swap never mixes two
//! configurations inside one request. Writers (config reload, admin
//! commands) build a new snapshot and publish it with one atomic store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::balance::{least_connections, SmoothWrr};
use crate::config::{Algorithm, Config};
use crate::health::{BackendHealth, HealthKey, HealthRegistry, HealthState};
use crate::routing::RouteTable;

/// Runtime changes made over the admin socket on top of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Pool weights per route, replacing the file's weights for that route.
    pub weights: BTreeMap<String, BTreeMap<String, u32>>,
    /// Backends that get no new requests, as (pool, address).
    pub drained: BTreeSet<(String, SocketAddr)>,
}

#[derive(Debug)]
pub struct BackendSlot {
    pub address: SocketAddr,
    pub weight: u32,
    pub drained: bool,
    pub health: Arc<BackendHealth>,
}

impl BackendSlot {
    /// The weight this backend may be picked with now; 0 when it must not be.
    fn effective_weight(&self, exclude: &[SocketAddr]) -> u32 {
        if self.drained || !self.health.is_healthy() || exclude.contains(&self.address) {
            0
        } else {
            self.weight
        }
    }
}

#[derive(Debug)]
pub struct PoolState {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<BackendSlot>,
    picker: SmoothWrr,
    rotation: AtomicUsize,
}

impl PoolState {
    fn has_candidate(&self, exclude: &[SocketAddr]) -> bool {
        self.backends
            .iter()
            .any(|b| b.effective_weight(exclude) > 0)
    }

    pub fn healthy_backends(&self) -> usize {
        self.backends
            .iter()
            .filter(|b| b.health.is_healthy() && !b.drained && b.weight > 0)
            .count()
    }

    fn pick(&self, exclude: &[SocketAddr]) -> Option<usize> {
        match self.algorithm {
            Algorithm::RoundRobin => self
                .picker
                .pick(|i| self.backends[i].effective_weight(exclude)),
            Algorithm::LeastConnections => {
                let start = self.rotation.fetch_add(1, Ordering::Relaxed);
                least_connections(
                    self.backends.len(),
                    start % self.backends.len().max(1),
                    |i| self.backends[i].effective_weight(exclude),
                    |i| self.backends[i].health.in_flight(),
                )
            }
        }
    }
}

#[derive(Debug)]
pub struct RoutePool {
    pub pool: Arc<PoolState>,
    pub weight: u32,
}

#[derive(Debug)]
pub struct RouteState {
    pub name: String,
    pub pools: Vec<RoutePool>,
    picker: SmoothWrr,
}

/// The backend chosen for one request attempt.
#[derive(Clone, Debug)]
pub struct Pick {
    pub pool: Arc<PoolState>,
    pub address: SocketAddr,
    pub health: Arc<BackendHealth>,
}

impl RouteState {
    /// Picks a pool by smooth weighted round robin among the pools with a
    /// weight above 0 and at least one available backend, then a backend in
    /// it. Backends in `exclude` are skipped (they already failed this request).
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Pick> {
        let index = self.picker.pick(|i| {
            let entry = &self.pools[i];
            if entry.weight > 0 && entry.pool.has_candidate(exclude) {
                entry.weight
            } else {
                0
            }
        })?;
        let pool = &self.pools[index].pool;
        let backend = pool.pick(exclude)?;
        let slot = &pool.backends[backend];
        Some(Pick {
            pool: Arc::clone(pool),
            address: slot.address,
            health: Arc::clone(&slot.health),
        })
    }

    /// Whether a backend that could serve this route is still waiting for
    /// its first health check.
    pub fn has_pending(&self) -> bool {
        self.pools.iter().filter(|p| p.weight > 0).any(|p| {
            p.pool
                .backends
                .iter()
                .any(|b| b.weight > 0 && !b.drained && b.health.state() == HealthState::Pending)
        })
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub overrides: Overrides,
    pub routes: RouteTable,
    /// Same order as `config.routes`.
    pub route_states: Vec<RouteState>,
    pub pools: BTreeMap<String, Arc<PoolState>>,
}

impl Snapshot {
    /// Builds the runtime view of `config` with `overrides` applied. Weight
    /// overrides for a route whose pools no longer match the file are dropped
    /// with a warning, so a stale override never points at a missing pool.
    pub fn build(
        config: Arc<Config>,
        overrides: Overrides,
        registry: &HealthRegistry,
        generation: u64,
    ) -> Snapshot {
        let mut overrides = overrides;
        let mut pools = BTreeMap::new();
        for (name, pool) in &config.pools {
            let backends = pool
                .backends
                .iter()
                .map(|backend| BackendSlot {
                    address: backend.address,
                    weight: backend.weight,
                    drained: overrides.drained.contains(&(name.clone(), backend.address)),
                    health: registry.entry(&HealthKey {
                        address: backend.address,
                        check: pool.health.clone(),
                    }),
                })
                .collect::<Vec<_>>();
            let count = backends.len();
            pools.insert(
                name.clone(),
                Arc::new(PoolState {
                    name: name.clone(),
                    algorithm: pool.algorithm,
                    backends,
                    picker: SmoothWrr::new(count),
                    rotation: AtomicUsize::new(0),
                }),
            );
        }
        overrides.drained.retain(|(pool, address)| {
            let known = config
                .pools
                .get(pool)
                .is_some_and(|p| p.backends.iter().any(|b| b.address == *address));
            if !known {
                tracing::warn!(pool = %pool, backend = %address, "dropping the drain of a backend that is no longer in the config");
            }
            known
        });

        let mut route_states = Vec::new();
        for route in &config.routes {
            let file_pools: BTreeSet<&String> = route.pools.iter().map(|(p, _)| p).collect();
            let override_weights = overrides.weights.get(&route.name).filter(|weights| {
                let same = weights.keys().collect::<BTreeSet<_>>() == file_pools;
                if !same {
                    tracing::warn!(route = %route.name, "dropping runtime weights because the route's pools changed in the config file");
                }
                same
            });
            let entries = route
                .pools
                .iter()
                .filter_map(|(pool, file_weight)| {
                    let weight = override_weights
                        .and_then(|w| w.get(pool).copied())
                        .unwrap_or(*file_weight);
                    pools.get(pool).map(|state| RoutePool {
                        pool: Arc::clone(state),
                        weight,
                    })
                })
                .collect::<Vec<_>>();
            let count = entries.len();
            route_states.push(RouteState {
                name: route.name.clone(),
                pools: entries,
                picker: SmoothWrr::new(count),
            });
        }
        overrides.weights.retain(|route, weights| {
            config.route(route).is_some_and(|r| {
                r.pools.iter().map(|(p, _)| p).collect::<BTreeSet<_>>()
                    == weights.keys().collect::<BTreeSet<_>>()
            })
        });

        Snapshot {
            generation,
            routes: RouteTable::new(&config.routes),
            config,
            overrides,
            route_states,
            pools,
        }
    }

    /// Every health key this snapshot uses, so the registry can drop the rest.
    pub fn health_keys(&self) -> HashSet<HealthKey> {
        self.config
            .pools
            .values()
            .flat_map(|pool| {
                pool.backends.iter().map(|backend| HealthKey {
                    address: backend.address,
                    check: pool.health.clone(),
                })
            })
            .collect()
    }

    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.route_states.iter().position(|r| r.name == name)
    }

    /// Current weights of a route, by pool name.
    pub fn weights(&self, route: usize) -> BTreeMap<String, u32> {
        self.route_states[route]
            .pools
            .iter()
            .map(|p| (p.pool.name.clone(), p.weight))
            .collect()
    }
}

/// The published snapshot, plus a lock that serializes writers so each
/// change is built from the snapshot it replaces.
pub struct SnapshotCell {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl SnapshotCell {
    pub fn new(snapshot: Snapshot) -> SnapshotCell {
        SnapshotCell {
            current: ArcSwap::from_pointee(snapshot),
            writer: Mutex::new(()),
        }
    }

    /// The snapshot new requests use.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Takes the writer lock; hold it while building and storing a change.
    pub fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a new snapshot. The caller must hold the writer lock.
    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}
