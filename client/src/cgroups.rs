//! Names for the cgroup ids events carry (`Event.cgroup_id`): their paths
//! on socktapd's host, asked of socktapd (`GetCgroupPaths`) once per id and
//! kept. cgroup ids are never reused, so an answer holds for the id's life,
//! and an id socktapd could not name (its cgroup already removed) is not
//! asked again. An id whose request failed was not answered: it is asked
//! again with the next request that names it.
//!
//! The cache does no I/O: it says what to ask ([`CgroupNames::requests`])
//! and takes the answers ([`CgroupNames::learn`]), so a pipeline can send
//! the requests with its own client.
//!
//! ```no_run
//! # async fn demo(events: Vec<socktap_client::api::Event>) -> Result<(), Box<dyn std::error::Error>> {
//! use socktap_client::{cgroups::CgroupNames, connect};
//! let mut client = connect(&"127.0.0.1:50051".parse()?).await?;
//! let mut names = CgroupNames::default();
//! for request in names.requests(events.iter().map(|e| e.cgroup_id)) {
//!     let asked = request.cgroup_ids.clone();
//!     let answer = client.get_cgroup_paths(request).await?.into_inner();
//!     names.learn(&asked, answer);
//! }
//! for e in &events {
//!     println!("{} {}", e.cookie, names.name(e.cgroup_id).unwrap_or("?"));
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeSet, HashMap};

pub use socktap_proto::MAX_CGROUP_IDS_PER_REQUEST as MAX_IDS_PER_REQUEST;

use crate::api;

/// What socktapd said of each cgroup id asked about: its path, or that it
/// has none (removed before it was asked about).
#[derive(Clone, Debug, Default)]
pub struct CgroupNames {
    known: HashMap<u64, Option<String>>,
}

impl CgroupNames {
    /// The path of cgroup `id`, if it is known.
    pub fn name(&self, id: u64) -> Option<&str> {
        self.known.get(&id).and_then(|p| p.as_deref())
    }

    /// The requests that would name every id among `ids` not answered
    /// yet (each id once, at most [`MAX_IDS_PER_REQUEST`] per request).
    pub fn requests(&self, ids: impl IntoIterator<Item = u64>) -> Vec<api::GetCgroupPathsRequest> {
        let new: BTreeSet<u64> = ids.into_iter().filter(|id| !self.known.contains_key(id)).collect();
        let new: Vec<u64> = new.into_iter().collect();
        new.chunks(MAX_IDS_PER_REQUEST)
            .map(|ids| api::GetCgroupPathsRequest {
                cgroup_ids: ids.to_vec(),
            })
            .collect()
    }

    /// Takes socktapd's answer to a request for `asked`: the ids it named
    /// get their paths, the others are known to have none.
    pub fn learn(&mut self, asked: &[u64], mut answer: api::GetCgroupPathsResponse) {
        for id in asked {
            self.known.insert(*id, answer.paths.remove(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_each_new_id_once_in_bounded_requests() {
        let mut names = CgroupNames::default();
        let requests = names.requests([7, 3, 7, 3]);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].cgroup_ids, vec![3, 7], "each id once");

        let answer = api::GetCgroupPathsResponse {
            paths: [(7, "/system.slice/app.service".to_owned())].into(),
        };
        names.learn(&[3, 7], answer);
        assert_eq!(names.name(7), Some("/system.slice/app.service"));
        assert_eq!(names.name(3), None, "not named: its cgroup is gone");
        assert_eq!(names.name(9), None, "never asked");
        assert!(names.requests([3, 7]).is_empty(), "neither is asked again");
        assert_eq!(names.requests([3, 9])[0].cgroup_ids, vec![9]);

        let many = names.requests(1000..3100);
        let sizes: Vec<usize> = many.iter().map(|r| r.cgroup_ids.len()).collect();
        assert_eq!(sizes, vec![1024, 1024, 52]);
    }
}
