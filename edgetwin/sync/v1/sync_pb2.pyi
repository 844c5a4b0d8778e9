from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_MSGPACK: _ClassVar[Encoding]
    ENCODING_MSGPACK_ZLIB: _ClassVar[Encoding]
    ENCODING_MSGPACK_ZSTREAM: _ClassVar[Encoding]
ENCODING_UNSPECIFIED: Encoding
ENCODING_MSGPACK: Encoding
ENCODING_MSGPACK_ZLIB: Encoding
ENCODING_MSGPACK_ZSTREAM: Encoding

class Frame(_message.Message):
    __slots__ = ("seq", "ack", "encoding", "payload", "echo")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    seq: int
    ack: int
    encoding: Encoding
    payload: bytes
    echo: bool
    def __init__(self, seq: _Optional[int] = ..., ack: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., payload: _Optional[bytes] = ..., echo: _Optional[bool] = ...) -> None: ...
