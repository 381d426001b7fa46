"""Ray Serve: online scoring with per-host context, equal to batch scoring.

``build_app(ServeArgs)`` returns the application; ``run_serve`` is ``nadray serve``;
``noop_app()`` is the benchmark baseline on the same HTTP path. The code lives in
``nadray/serving/`` (api: HTTP and validation; routing: entity -> shard; shard:
scorer state and swaps; app: deployments).

Design
------
*Topology.* With ``num_replicas`` 1 (the default) one ``ingress`` deployment
(FastAPI, token check, body limits, pydantic validation) holds the scorer
(``ShardCore``) and scores in process: no second deployment hop. With
``num_replicas`` N > 1, the ingress routes to N scorer shards, deployed as
separate single-replica deployments ``scorer-0 .. scorer-{N-1}``. Serve's router
picks any replica of a deployment, but an entity's context must always see that
entity's records, so each shard is its own deployment and the ingress addresses
it by DeploymentHandle: sticky by construction, no custom router.

*Routing.* The ingress computes each flow's entities with the features' own rule
(``features.local_sides`` with the model's ``local_networks``) and sends the flow
to the shard ``crc32(entity) % N`` of each entity: one shard for inbound or
outbound flows, up to two for internal/unknown ones. A shard scores only the
entities it owns (``score_online(..., entity_filter=...)``); the ingress takes the
highest score per flow, as batch scoring does, and answers in request order. With
one shard the request goes through unchanged.

*Batching and order.* ``ScorerShard.score`` (and the ingress's in-process scoring in
single-shard mode) is a ``@serve.batch`` method: requests from many callers that
arrive within ``batch_wait_timeout_s`` (default 0: those queued while the previous
batch ran) are concatenated (each caller's records kept together and in order) and
scored in one ``score_online`` call; batches run one at a time under a lock, so
context updates are ordered. Batches up to ``shard.INLINE_ROWS`` flows are scored
on the event loop (no thread hand-off); ``score_online`` takes a numpy fast path
for flow-mode records in time order (``online_features.OnlineFlowEncoder``).

*Model updates.* The ingress polls ``champion.json`` every ``poll_champion_s``
(``POST /admin/reload`` checks at once; a ``REF@VERSION`` is pinned and never
changes). On a new champion every shard first loads it in a thread while still
serving (``prepare``), then all switch between batches (``activate``): in-flight
batches finish on the old scorer, no request fails. Contexts are reset on a swap
(the new model's encoder and hidden state differ). ``reconfigure(user_config)``
with ``{"threshold": x}`` changes the threshold without a restart and survives
swaps; ``{"threshold": null}`` restores the checkpoint's own.

*Security.* With ``NADRAY_API_TOKEN`` set, every path but ``/healthz`` needs
``Authorization: Bearer <token>``, compared in constant time through SHA-256
digests; only the digest travels to the cluster.

*Observability.* Counters ``nadray_flows_scored``, ``nadray_anomalies_flagged``,
``nadray_context_evictions``, ``nadray_model_swaps``, gauge
``nadray_entities_held`` (tagged by deployment and replica); one-line JSON log
events (ready, model loaded/swapped, threshold, poll failures) with no payloads
or secrets.
"""

from nadray.serving.app import APP_NAME, ServeArgs, build_app, noop_app, run_serve

__all__ = ["APP_NAME", "ServeArgs", "build_app", "noop_app", "run_serve"]
