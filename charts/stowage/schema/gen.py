#!/usr/bin/env python3
"""Writes charts/stowage/values.schema.json. The backend instance keys are the Stowage config
keys (backends/src/config.rs, rbd/mod.rs, glusterfs/config.rs; all deny_unknown_fields there
too). Run after changing values.yaml; 85-helm.sh checks the file is up to date."""
import json, os

def obj(props, required=(), extra=False, **kw):
    d = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        d["required"] = list(required)
    d.update(kw)
    return d

S = {"type": "string"}
B = {"type": "boolean"}
I = {"type": "integer", "minimum": 0}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
STRS = {"type": "array", "items": S}
ANY_OBJ = {"type": "object"}
MODE = {"type": "string", "pattern": "^0?[0-7]{3,4}$"}
K8S_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
ABS = {"type": "string", "pattern": "^/"}

dirset = {"dirMode": MODE, "dirUid": I, "dirGid": I, "maxVolumeBytes": I}
instances = {
    "local": {"baseDir": ABS, "block": B, "capacity": {"enum": ["auto", "quota", "image", "off"]}, **dirset},
    "nfs": {"server": S, "export": S, "baseDir": S, "nfsPort": PORT, "mountPort": PORT, "uid": I,
            "gid": I, "privilegedPort": B, "mountOptions": STRS, "timeoutSecs": I, **dirset},
    "glusterfs": {"servers": STRS, "mode": {"enum": ["subdir", "volume"]}, "volume": S,
                  "bricks": {"type": "array", "items": obj({"host": S, "dir": S}, ["host", "dir"])},
                  "replica": I, "volumePrefix": S, "baseDir": S,
                  "glusterd": obj({"socket": S, "cli": S,
                                   "ssh": obj({"host": S, "user": S, "port": PORT, "identityFile": S,
                                               "knownHostsFile": S}, ["host"])}),
                  "cliTimeoutSecs": I, "stateDir": S, "mountOptions": STRS, "manageQuota": B, **dirset},
    "s3": {"endpoint": S, "region": S, "pathStyle": B, "mode": {"enum": ["bucket", "prefix"]},
           "bucket": S, "bucketPrefix": S, "mounter": {"enum": ["s3fs", "rclone"]},
           "mountOptions": STRS, "timeoutSecs": I, "maxVolumeBytes": I},
    "rbd": {"monitors": S, "pool": S, "imagePrefix": S, "imageFeatures": S,
            "attach": {"enum": ["krbd", "rbd-nbd", "rbd-fuse"]}, "mapOptions": STRS, "userId": S,
            "keyringFile": S, "runDir": S, "opTimeoutSecs": I, "requireNodeRegistration": B},
}
required = {"local": ["baseDir"], "nfs": ["server", "export"], "glusterfs": ["servers"],
            "s3": [], "rbd": ["monitors"]}

storage_class = obj({
    "name": K8S_NAME,
    "isDefault": B,
    "reclaimPolicy": {"enum": ["Delete", "Retain", "Recycle"]},
    "volumeBindingMode": {"enum": ["Immediate", "WaitForFirstConsumer"]},
    "allowVolumeExpansion": B,
    "mountOptions": STRS,
    "parameters": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
}, ["name", "reclaimPolicy", "volumeBindingMode"])

snapshot_class = obj({
    "name": K8S_NAME,
    "isDefault": B,
    "deletionPolicy": {"enum": ["Delete", "Retain"]},
    "parameters": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
}, ["name", "deletionPolicy"])

def backend(kind):
    cfg = {"instances": {"type": "object", "minProperties": 1,
                         "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
                         "additionalProperties": obj(instances[kind], required[kind])}}
    if kind == "s3":
        cfg["nodeStateDir"] = ABS
    props = {
        "enabled": B,
        "config": obj(cfg, ["instances"]),
        "csiDriver": obj({"attachRequired": B,
                          "fsGroupPolicy": {"enum": ["None", "File", "ReadWriteOnceWithFSType"]}},
                         ["attachRequired", "fsGroupPolicy"]),
        "storageClasses": {"type": "array", "items": storage_class},
        "snapshotClasses": {"type": "array", "items": snapshot_class},
    }
    if kind == "s3":
        props["credentials"] = obj({"existingSecret": S, "create": B, "accessKeyID": S, "secretAccessKey": S})
    if kind == "rbd":
        props["credentials"] = obj({"existingSecret": S, "create": B, "userID": S, "userKey": S})
    return obj(props, ["enabled"])

sched = {"resources": ANY_OBJ, "nodeSelector": {"type": "object", "additionalProperties": S},
         "tolerations": {"type": "array", "items": ANY_OBJ}, "affinity": ANY_OBJ,
         "priorityClassName": S, "podAnnotations": {"type": "object", "additionalProperties": S},
         "podLabels": {"type": "object", "additionalProperties": S}}

schema = obj({
    "image": obj({"repository": {"type": "string", "minLength": 1}, "tag": S,
                  "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                  "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, ["repository"]),
    "imagePullSecrets": {"type": "array", "items": obj({"name": S}, ["name"])},
    "kubeletRoot": ABS,
    "stateDir": ABS,
    "runDir": ABS,
    "logFormat": {"enum": ["text", "json"]},
    "controller": obj({"replicas": {"type": "integer", "minimum": 1}, "leaderElection": B,
                       "binder": {"enum": ["kcm", "builtin"]},
                       "duties": {"type": "array", "minItems": 1, "uniqueItems": True,
                                  "items": {"enum": ["provision", "attach", "resize", "snapshot"]}},
                       "kubeApiQps": {"type": "integer", "minimum": 1},
                       "kubeApiBurst": {"type": "integer", "minimum": 1},
                       "metricsPort": PORT, "csiMetricsPort": PORT, "hostNetwork": B,
                       "extraEnv": {"type": "array", "items": obj({"name": S, "value": S, "valueFrom": ANY_OBJ}, ["name"])},
                       **sched}),
    "node": obj({"healthPort": PORT, "hostNetwork": B, "maxVolumes": I, "mountTimeoutSecs": {"type": "integer", "minimum": 1},
                 "updateStrategy": ANY_OBJ, **sched}),
    "metrics": obj({"service": obj({"enabled": B, "port": PORT, "csiPort": PORT}),
                    "serviceMonitor": obj({"enabled": B, "interval": S,
                                           "labels": {"type": "object", "additionalProperties": S}})}),
    "snapshots": obj({"commonController": B}),
    "backends": obj({k: backend(k) for k in ["local", "nfs", "glusterfs", "s3", "rbd"]}),
    "tests": obj({"image": S, "size": {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"},
                  "timeoutSeconds": {"type": "integer", "minimum": 10}}),
    "global": ANY_OBJ,
}, title="Stowage chart values", **{"$schema": "https://json-schema.org/draft-07/schema#"})
schema["properties"]["global"] = {"type": "object"}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "values.schema.json")
text = json.dumps(schema, indent=2, sort_keys=False) + "\n"
if os.environ.get("CHECK"):
    raise SystemExit(0 if open(out).read() == text else "values.schema.json is out of date: run charts/stowage/schema/gen.py")
open(out, "w").write(text)
