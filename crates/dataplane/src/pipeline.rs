//! Compile and program: [`Pipeline`] (the incremental compiler and a
//! backend) and [`Node`] (a pipeline with the cluster state it follows).

use std::borrow::Cow;

use compiler::{CompileOptions, IncrementalCompiler, LogicalRuleset, Outcome};
use model::state::ClusterState;
use tracing::warn;
use watcher::{Cache, Update};

use crate::{Change, Changes, Dataplane, Desired, Error};

/// The incremental compiler and the backend it feeds. Each apply compiles
/// the changes since the last one and hands the backend the result with
/// what changed; after any failure the next apply is a full one.
pub struct Pipeline {
    compiler: IncrementalCompiler,
    dataplane: Box<dyn Dataplane>,
    /// The next apply makes the kernel equal the whole ruleset, whatever
    /// the compile found changed (at the start, and after a failure or a
    /// repair).
    full_next: bool,
}

impl Pipeline {
    pub fn new(opts: CompileOptions, dataplane: Box<dyn Dataplane>) -> Pipeline {
        Pipeline {
            compiler: IncrementalCompiler::new(opts),
            dataplane,
            full_next: true,
        }
    }

    /// Brings the compiler up to `state` (`changes` since the last call,
    /// with their values before) and the kernel up to the compiler. On
    /// error the previous ruleset stays in force; the compiler has taken
    /// the changes in anyway (a compile error makes the next apply compile
    /// from scratch), and the next apply diffs the whole ruleset against a
    /// fresh read of the kernel.
    pub fn apply(&mut self, state: &ClusterState, changes: &Changes) -> Result<(), Error> {
        let result = self.compile_and_program(state, changes);
        if let Err(e) = &result {
            self.full_next = true;
            if self.compiler.logical().is_none() || matches!(e, Error::Compile(_)) {
                self.compiler.reset();
            }
            // Best effort: the next apply reads the kernel anyway if this
            // fails too.
            let _ = self.dataplane.invalidate();
        } else {
            self.full_next = false;
        }
        result
    }

    fn compile_and_program(
        &mut self,
        state: &ClusterState,
        changes: &Changes,
    ) -> Result<(), Error> {
        let full_next = self.full_next;
        let dataplane = &mut self.dataplane;
        // A full compile hands over its rulesets as soon as they exist and
        // finishes its own records while the kernel takes them.
        let (_, programmed) =
            self.compiler
                .update_then(state, changes, |logical, ruleset, outcome| {
                    let change = match outcome {
                        _ if full_next => Change::Full,
                        Outcome::Rebuilt => Change::Full,
                        Outcome::Elements(delta) => Change::Elements(delta),
                        Outcome::Patch(patch) => Change::Patch(patch),
                    };
                    dataplane.apply(&Desired {
                        logical,
                        ruleset,
                        change,
                    })
                })?;
        programmed
    }

    /// What the last successful compile produced, whole (the change is
    /// [`Change::Full`]); `None` before the first.
    pub fn desired(&self) -> Option<Desired<'_>> {
        Some(Desired {
            logical: self.compiler.logical()?,
            ruleset: self.compiler.ruleset(),
            change: Change::Full,
        })
    }

    /// Whether the kernel differs from what was last applied. Nothing was
    /// applied yet: nothing to compare, no drift.
    pub fn has_drift(&mut self) -> Result<bool, Error> {
        let Some(logical) = self.compiler.logical() else {
            return Ok(false);
        };
        let desired = Desired {
            logical,
            ruleset: self.compiler.ruleset(),
            change: Change::Full,
        };
        self.dataplane.has_drift(&desired)
    }

    /// Re-reads the kernel and makes it hold the last compiled ruleset (or
    /// `state`'s, compiled now, if nothing was compiled yet).
    pub fn repair(&mut self, state: &ClusterState) -> Result<(), Error> {
        self.full_next = true;
        self.dataplane.invalidate()?;
        self.apply(state, &Changes::new())
    }

    /// The last resort when applies keep failing: compiles `state` from
    /// scratch and has the backend replace its state whole in one atomic
    /// transaction. `Ok(false)` when the backend cannot.
    pub fn rebuild(&mut self, state: &ClusterState) -> Result<bool, Error> {
        self.full_next = true;
        let dataplane = &mut self.dataplane;
        self.compiler.rebuild_then(state, |logical, ruleset| {
            dataplane.rebuild(&Desired {
                logical,
                ruleset,
                change: Change::Full,
            })
        })?
    }

    /// The logical ruleset of the last compile.
    pub fn logical(&self) -> Option<&LogicalRuleset> {
        self.compiler.logical()
    }

    pub fn compiler(&self) -> &IncrementalCompiler {
        &self.compiler
    }

    pub fn dataplane(&self) -> &dyn Dataplane {
        self.dataplane.as_ref()
    }

    pub fn dataplane_mut(&mut self) -> &mut dyn Dataplane {
        self.dataplane.as_mut()
    }
}

/// One node's dataplane kept in step with its cluster state: datastore
/// updates fold into the state, remembering what they changed, and each
/// [`apply`](Node::apply) programs everything folded since the last one.
/// The agent's programmer thread is one of these.
pub struct Node {
    cache: Cache,
    /// Changes since the last apply, with the values before them.
    changes: Changes,
    pipeline: Pipeline,
    removed_other: bool,
}

impl Node {
    pub fn new(pipeline: Pipeline) -> Node {
        Node {
            cache: Cache::new(),
            changes: Changes::new(),
            pipeline,
            removed_other: false,
        }
    }

    /// Folds datastore updates into the state (moved, never copied).
    pub fn fold(&mut self, updates: Vec<Update>) {
        // Nothing compiled yet (the start, or after a compile error): the
        // next apply compiles in full and reads no changes, so none are
        // kept — at the first list of a large cluster they would be one
        // entry per object.
        let compiled = self.pipeline.compiler().logical().is_some();
        for u in updates {
            if let Update::Upsert { key, .. } | Update::Delete { key, .. } = &u {
                if compiled && !self.changes.contains_key(key) {
                    let old = self.cache.state.get(key).map(Cow::into_owned);
                    self.changes.insert(key.clone(), old);
                }
            }
            self.cache.apply(u);
        }
    }

    /// Programs everything folded in so far (see [`Pipeline::apply`]).
    /// After the first success, removes the other backend's state; a
    /// failure there is logged, not returned (this backend enforces).
    pub fn apply(&mut self) -> Result<(), Error> {
        let result = self.pipeline.apply(&self.cache.state, &self.changes);
        // The compiler has taken the changes in, whether or not the kernel
        // did.
        self.changes.clear();
        result?;
        if !self.removed_other {
            match self.pipeline.dataplane_mut().remove_other() {
                Ok(()) => self.removed_other = true,
                Err(e) => warn!(
                    "removing the other backend's state: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        Ok(())
    }

    /// See [`Pipeline::has_drift`].
    pub fn has_drift(&mut self) -> Result<bool, Error> {
        self.pipeline.has_drift()
    }

    /// See [`Pipeline::repair`].
    pub fn repair(&mut self) -> Result<(), Error> {
        self.pipeline.repair(&self.cache.state)
    }

    /// See [`Pipeline::rebuild`].
    pub fn rebuild(&mut self) -> Result<bool, Error> {
        self.pipeline.rebuild(&self.cache.state)
    }

    pub fn state(&self) -> &ClusterState {
        &self.cache.state
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn pipeline_mut(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }
}
