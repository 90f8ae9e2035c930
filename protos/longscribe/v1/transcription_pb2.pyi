import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_DOWNLOADING: _ClassVar[JobState]
    JOB_STATE_DECODING: _ClassVar[JobState]
    JOB_STATE_TRANSCRIBING: _ClassVar[JobState]
    JOB_STATE_FINALIZING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class LiveSourceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIVE_SOURCE_STATE_UNSPECIFIED: _ClassVar[LiveSourceState]
    LIVE_SOURCE_OK: _ClassVar[LiveSourceState]
    LIVE_SOURCE_BACKPRESSURE: _ClassVar[LiveSourceState]
    LIVE_SOURCE_DROPPING: _ClassVar[LiveSourceState]
    LIVE_SOURCE_DROPPED: _ClassVar[LiveSourceState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_DOWNLOADING: JobState
JOB_STATE_DECODING: JobState
JOB_STATE_TRANSCRIBING: JobState
JOB_STATE_FINALIZING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
LIVE_SOURCE_STATE_UNSPECIFIED: LiveSourceState
LIVE_SOURCE_OK: LiveSourceState
LIVE_SOURCE_BACKPRESSURE: LiveSourceState
LIVE_SOURCE_DROPPING: LiveSourceState
LIVE_SOURCE_DROPPED: LiveSourceState

class TranscriptionOptions(_message.Message):
    __slots__ = ("language", "task", "initial_prompt")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    language: str
    task: str
    initial_prompt: str
    def __init__(self, language: _Optional[str] = ..., task: _Optional[str] = ..., initial_prompt: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("url", "server_path", "options", "request_id")
    URL_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    url: str
    server_path: str
    options: TranscriptionOptions
    request_id: str
    def __init__(self, url: _Optional[str] = ..., server_path: _Optional[str] = ..., options: _Optional[_Union[TranscriptionOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UploadMetadata(_message.Message):
    __slots__ = ("filename", "options", "request_id", "size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    options: TranscriptionOptions
    request_id: str
    size_bytes: int
    def __init__(self, filename: _Optional[str] = ..., options: _Optional[_Union[TranscriptionOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_index")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_index: int
    def __init__(self, job_id: _Optional[str] = ..., from_index: _Optional[int] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("job", "cancel_on_disconnect")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    job: SubmitJobRequest
    cancel_on_disconnect: bool
    def __init__(self, job: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., cancel_on_disconnect: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "include_result")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_result: bool
    def __init__(self, job_id: _Optional[str] = ..., include_result: _Optional[bool] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "percent", "bytes_done", "bytes_total", "audio_seconds_done", "audio_seconds_total", "chunk_index", "chunk_count", "eta_seconds", "realtime_factor", "bytes_per_second", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_DONE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REALTIME_FACTOR_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: JobState
    percent: float
    bytes_done: int
    bytes_total: int
    audio_seconds_done: float
    audio_seconds_total: float
    chunk_index: int
    chunk_count: int
    eta_seconds: float
    realtime_factor: float
    bytes_per_second: float
    message: str
    def __init__(self, phase: _Optional[_Union[JobState, str]] = ..., percent: _Optional[float] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., audio_seconds_done: _Optional[float] = ..., audio_seconds_total: _Optional[float] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., eta_seconds: _Optional[float] = ..., realtime_factor: _Optional[float] = ..., bytes_per_second: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("id", "start", "end", "text", "avg_logprob", "no_speech_prob", "compression_ratio", "temperature", "words", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    words: _containers.RepeatedCompositeFieldContainer[Word]
    source: str
    def __init__(self, id: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., compression_ratio: _Optional[float] = ..., temperature: _Optional[float] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("word", "start", "end", "probability")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    word: str
    start: float
    end: float
    probability: float
    def __init__(self, word: _Optional[str] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class Formats(_message.Message):
    __slots__ = ("txt", "srt", "vtt", "json")
    TXT_FIELD_NUMBER: _ClassVar[int]
    SRT_FIELD_NUMBER: _ClassVar[int]
    VTT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    txt: str
    srt: str
    vtt: str
    json: str
    def __init__(self, txt: _Optional[str] = ..., srt: _Optional[str] = ..., vtt: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("text", "segments", "language", "duration_seconds", "formats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    language: str
    duration_seconds: float
    formats: Formats
    def __init__(self, text: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., language: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., formats: _Optional[_Union[Formats, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("index", "job_id", "time", "state", "progress", "segment", "result", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    job_id: str
    time: _timestamp_pb2.Timestamp
    state: JobState
    progress: Progress
    segment: Segment
    result: Result
    error: Error
    def __init__(self, index: _Optional[int] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "source", "options", "request_id", "create_time", "update_time", "progress", "error", "result", "event_count", "chunks_total", "chunks_done", "chunks_reused", "duration_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REUSED_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    source: str
    options: TranscriptionOptions
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    progress: Progress
    error: Error
    result: Result
    event_count: int
    chunks_total: int
    chunks_done: int
    chunks_reused: int
    duration_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., source: _Optional[str] = ..., options: _Optional[_Union[TranscriptionOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., event_count: _Optional[int] = ..., chunks_total: _Optional[int] = ..., chunks_done: _Optional[int] = ..., chunks_reused: _Optional[int] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class LiveConfig(_message.Message):
    __slots__ = ("sources", "sample_rate", "encoding", "options", "session_id", "overflow", "no_partials")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    NO_PARTIALS_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedScalarFieldContainer[str]
    sample_rate: int
    encoding: str
    options: TranscriptionOptions
    session_id: str
    overflow: str
    no_partials: bool
    def __init__(self, sources: _Optional[_Iterable[str]] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[str] = ..., options: _Optional[_Union[TranscriptionOptions, _Mapping]] = ..., session_id: _Optional[str] = ..., overflow: _Optional[str] = ..., no_partials: _Optional[bool] = ...) -> None: ...

class LiveAudio(_message.Message):
    __slots__ = ("source", "data")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    source: str
    data: bytes
    def __init__(self, source: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class LiveRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: LiveConfig
    audio: LiveAudio
    def __init__(self, config: _Optional[_Union[LiveConfig, _Mapping]] = ..., audio: _Optional[_Union[LiveAudio, _Mapping]] = ...) -> None: ...

class LiveStarted(_message.Message):
    __slots__ = ("session_id", "resumed", "source_seconds")
    class SourceSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resumed: bool
    source_seconds: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., resumed: _Optional[bool] = ..., source_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LivePartial(_message.Message):
    __slots__ = ("source", "utterance", "start", "end", "text")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    source: str
    utterance: int
    start: float
    end: float
    text: str
    def __init__(self, source: _Optional[str] = ..., utterance: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class LiveFinal(_message.Message):
    __slots__ = ("source", "utterance", "start", "end", "text", "segments", "latency_seconds")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    source: str
    utterance: int
    start: float
    end: float
    text: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    latency_seconds: float
    def __init__(self, source: _Optional[str] = ..., utterance: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., latency_seconds: _Optional[float] = ...) -> None: ...

class LiveStatus(_message.Message):
    __slots__ = ("source", "state", "queue_depth", "queue_seconds", "dropped_seconds", "dropped_frames", "message")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    source: str
    state: LiveSourceState
    queue_depth: int
    queue_seconds: float
    dropped_seconds: float
    dropped_frames: int
    message: str
    def __init__(self, source: _Optional[str] = ..., state: _Optional[_Union[LiveSourceState, str]] = ..., queue_depth: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., dropped_seconds: _Optional[float] = ..., dropped_frames: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LiveEnd(_message.Message):
    __slots__ = ("session_id", "source_seconds", "finals", "dropped_seconds")
    class SourceSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINALS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    source_seconds: _containers.ScalarMap[str, float]
    finals: int
    dropped_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., source_seconds: _Optional[_Mapping[str, float]] = ..., finals: _Optional[int] = ..., dropped_seconds: _Optional[float] = ...) -> None: ...

class LiveEvent(_message.Message):
    __slots__ = ("started", "partial", "final", "status", "end")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    started: LiveStarted
    partial: LivePartial
    final: LiveFinal
    status: LiveStatus
    end: LiveEnd
    def __init__(self, started: _Optional[_Union[LiveStarted, _Mapping]] = ..., partial: _Optional[_Union[LivePartial, _Mapping]] = ..., final: _Optional[_Union[LiveFinal, _Mapping]] = ..., status: _Optional[_Union[LiveStatus, _Mapping]] = ..., end: _Optional[_Union[LiveEnd, _Mapping]] = ...) -> None: ...
