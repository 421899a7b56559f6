//! openraft's network over our inter-node links: each Raft RPC is one request on the link to
//! the target node ([`crate::cluster::rpc::Request::Raft`]), its body the JSON of a
//! [`RaftCall`], answered with the JSON of the target's result.

use std::sync::Weak;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;

use super::{Envelope, Member, NodeId, RaftCall, TypeConfig};
use crate::cluster::Cluster;

pub struct Network {
    pub cluster: Weak<Cluster>,
    /// None: the metadata group; else a replicated queue's group.
    pub group: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            cluster: self.cluster.clone(),
            group: self.group.clone(),
            target,
            name: node.name.clone(),
        }
    }
}

pub struct PeerClient {
    cluster: Weak<Cluster>,
    group: Option<String>,
    target: NodeId,
    name: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl PeerClient {
    async fn send<T, E>(
        &self,
        call: RaftCall,
        ttl: Duration,
    ) -> Result<T, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(cluster) = self.cluster.upgrade() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failed(
                "node is stopping".into(),
            ))));
        };
        let envelope = Envelope {
            group: self.group.clone(),
            to: Some(self.target),
            call,
        };
        let answer = cluster
            .raft_call(&self.name, &envelope, ttl)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Failed(e))))?;
        let result: Result<T, RaftError<NodeId, E>> = serde_json::from_str(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failed(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send(RaftCall::Append(rpc), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(RaftCall::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send(RaftCall::Vote(rpc), option.hard_ttl()).await
    }
}
