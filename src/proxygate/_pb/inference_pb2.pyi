from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "temperature", "max_tokens", "priority", "stop", "top_p", "seed", "has_seed", "raw_prompt", "messages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    temperature: float
    max_tokens: int
    priority: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_p: float
    seed: int
    has_seed: bool
    raw_prompt: bool
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., raw_prompt: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenResponse(_message.Message):
    __slots__ = ("request_id", "token", "finished", "error", "token_count", "finish_reason", "prompt_tokens", "cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: str
    finished: bool
    error: str
    token_count: int
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[str] = ..., finished: _Optional[bool] = ..., error: _Optional[str] = ..., token_count: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "current_queue_size", "gpu_utilization", "models", "max_concurrency", "active_sequences", "ready", "engine", "generations_started", "generations_cancelled", "peak_active", "prefix_cache_capacity_bytes", "prefix_cache_used_bytes", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_query_tokens", "prefix_cache_hit_tokens", "prefix_cache_evictions", "peak_calls")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_STARTED_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PEAK_CALLS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    current_queue_size: int
    gpu_utilization: float
    models: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    active_sequences: int
    ready: bool
    engine: str
    generations_started: int
    generations_cancelled: int
    peak_active: int
    prefix_cache_capacity_bytes: int
    prefix_cache_used_bytes: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_evictions: int
    peak_calls: int
    def __init__(self, healthy: _Optional[bool] = ..., current_queue_size: _Optional[int] = ..., gpu_utilization: _Optional[float] = ..., models: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ..., active_sequences: _Optional[int] = ..., ready: _Optional[bool] = ..., engine: _Optional[str] = ..., generations_started: _Optional[int] = ..., generations_cancelled: _Optional[int] = ..., peak_active: _Optional[int] = ..., prefix_cache_capacity_bytes: _Optional[int] = ..., prefix_cache_used_bytes: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cache_query_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., prefix_cache_evictions: _Optional[int] = ..., peak_calls: _Optional[int] = ...) -> None: ...
