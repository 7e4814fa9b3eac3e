//! The decision for one event, from memory: new, repeat, conflict or refusal, and the outputs
//! (forward, pairs) and late pairs it leads to.

use crate::join::rule::{attributes, LatePair, MAX_CLICKS_PER_IMPRESSION};
use crate::model::{Click, Event, Impression, ImpressionRecord, JoinedRecord, JoinedStreamRecord};

use super::memory::JoinMemory;
use super::model::{Outcome, Pending, StateRules, Step, Stored};

impl JoinMemory {
    /// Decides one event arriving (on its input stream) at `arrival_ms`, and stores it if it
    /// is new. The clock must have been advanced to the record's arrival first.
    pub fn decide(&mut self, event: &Event, arrival_ms: i64, rules: &StateRules) -> Step {
        let mut step = Step {
            outcome: Outcome::New,
            outputs: Vec::new(),
            late: Vec::new(),
            buffered: false,
            unmatched: 0,
        };
        let checkable_from = rules.checkable_from(self.now_ms);
        let entry = self.entries.get(event.impression_id());
        let refused = match event {
            Event::Impression(imp) => {
                let stored = entry.and_then(|e| e.impression.as_ref()).map(|(s, _)| s);
                repeat_or_unchecked(stored, imp, imp.event_time_ms, checkable_from)
            }
            Event::Click(click) => {
                let stored = entry
                    .and_then(|e| e.clicks.get(&click.click_id))
                    .map(|(s, _)| s);
                repeat_or_unchecked(stored, click, click.event_time_ms, checkable_from).or(entry
                    .is_some_and(|e| e.clicks.len() >= MAX_CLICKS_PER_IMPRESSION)
                    .then_some(Outcome::TooManyClicks))
            }
        };
        if let Some(outcome) = refused {
            step.outcome = outcome;
            return step;
        }
        match event {
            Event::Impression(imp) => self.impression_arrives(imp, arrival_ms, rules, &mut step),
            Event::Click(click) => self.click_arrives(click, arrival_ms, rules, &mut step),
        }
        step
    }

    /// A new impression: pairs with the stored clicks it attributes, forwarded, stored.
    fn impression_arrives(
        &mut self,
        imp: &Impression,
        arrival_ms: i64,
        rules: &StateRules,
        step: &mut Step,
    ) {
        let id = imp.impression_id.clone();
        let clicks: Vec<(Click, i64)> = self
            .entries
            .get(&id)
            .map(|e| e.clicks.values().cloned().collect())
            .unwrap_or_default();
        for (click, ca) in &clicks {
            match joins(rules, imp, arrival_ms, click, *ca) {
                None => step.unmatched += 1,
                Some(true) => {
                    self.remove_unmatched(&(
                        *ca,
                        click.impression_id.clone(),
                        click.click_id.clone(),
                    ));
                    step.outputs
                        .push(Pending::Pair(id.clone(), click.click_id.clone()));
                }
                Some(false) => step.late.push(LatePair {
                    impression: imp.clone(),
                    click: click.clone(),
                    arrival_gap_ms: (arrival_ms - ca).abs(),
                }),
            }
        }
        step.buffered = clicks.is_empty();
        step.outputs.push(Pending::Forward(id));
        self.store(Stored::Impression(imp.clone(), arrival_ms));
    }

    /// A new click: a pair with the stored impression if it attributes, else it waits (and is
    /// swept as an orphan when its retention ends); stored.
    fn click_arrives(
        &mut self,
        click: &Click,
        arrival_ms: i64,
        rules: &StateRules,
        step: &mut Step,
    ) {
        let stored = self
            .entries
            .get(&click.impression_id)
            .and_then(|e| e.impression.clone());
        let mut matched = false;
        match stored {
            Some((imp, ia)) => match joins(rules, &imp, ia, click, arrival_ms) {
                None => step.unmatched += 1,
                Some(true) => {
                    matched = true;
                    step.outputs.push(Pending::Pair(
                        click.impression_id.clone(),
                        click.click_id.clone(),
                    ));
                }
                Some(false) => step.late.push(LatePair {
                    impression: imp.clone(),
                    click: click.clone(),
                    arrival_gap_ms: (arrival_ms - ia).abs(),
                }),
            },
            None => step.buffered = true,
        }
        if !matched {
            self.add_unmatched((
                arrival_ms,
                click.impression_id.clone(),
                click.click_id.clone(),
            ));
        }
        self.store(Stored::Click(click.clone(), arrival_ms));
    }

    /// The joined-stream record of a pending output, from the stored events.
    pub fn materialize(&self, p: &Pending, recovered: bool) -> Option<JoinedStreamRecord> {
        let entry = self.entries.get(p.impression_id())?;
        let (imp, _) = entry.impression.as_ref()?;
        match p {
            Pending::Forward(_) => Some(JoinedStreamRecord::Impression(ImpressionRecord::new(
                imp, recovered,
            ))),
            Pending::Pair(_, click_id) => {
                let (click, _) = entry.clicks.get(click_id)?;
                let mut record = JoinedRecord::new(imp, click);
                record.recovered = recovered;
                Some(JoinedStreamRecord::Click(record))
            }
        }
    }
}

/// A stored event with the arriving one's id is a duplicate (same content) or a conflict; an
/// event not stored but older than the horizon can no longer be checked. `None`: it is new.
fn repeat_or_unchecked<T: PartialEq>(
    stored: Option<&T>,
    arriving: &T,
    event_time_ms: i64,
    checkable_from_ms: i64,
) -> Option<Outcome> {
    match stored {
        Some(s) if s == arriving => Some(Outcome::Duplicate),
        Some(_) => Some(Outcome::Conflicting),
        None if event_time_ms < checkable_from_ms => Some(Outcome::PastHorizon),
        None => None,
    }
}

/// Whether a stored pair joins: `None` if the rule does not attribute the click to the
/// impression; else whether the partners met within the retention (`false`: a late pair).
fn joins(rules: &StateRules, imp: &Impression, ia: i64, click: &Click, ca: i64) -> Option<bool> {
    attributes(&rules.join, imp, click).then(|| (ia - ca).abs() <= rules.join.retention_ms)
}
