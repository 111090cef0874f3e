# ElastiCache for Redis 7, cluster mode disabled: a primary and a replica in the two private
# subnets, automatic failover, TLS in transit, encryption at rest, AUTH from Secrets Manager.
# ElastiCache does not allow `appendonly` to be changed: durability comes from the replica
# (Multi-AZ, automatic failover) and daily snapshots.
#
# maxmemory-policy is `noeviction`: ElastiCache's default, volatile-lru, silently evicts
# keys with a TTL (finished tasks, worker records, idempotency keys) under memory pressure.
# With noeviction a full Redis refuses writes instead (the master answers 507
# storage_full), and the redis_memory alarm in alarms.tf warns well before that. Every
# service logs a warning at start if it finds another policy.

resource "aws_elasticache_subnet_group" "redis" {
  name       = local.prefix
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_elasticache_parameter_group" "redis" {
  name        = "${local.prefix}-redis7"
  family      = "redis7"
  description = "Ensemble: key-space notifications for expired keys; never evict keys"

  parameter {
    name  = "notify-keyspace-events"
    value = "Ex"
  }

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }

  # A task's hash holds its input, its events and each step's output. With Redis's default
  # (64 bytes) any of them longer than 64 bytes turns the whole hash into a hashtable: 1,408
  # bytes for a queued one-step task with a 100-byte input, against 552 as a listpack
  # (BENCHMARKS.md, "The scale figures"). A hash with a value over 1,024 bytes (a large
  # output) still converts, so lookups in the compact form stay short.
  parameter {
    name  = "hash-max-listpack-value"
    value = "1024"
  }
}

resource "aws_elasticache_replication_group" "redis" {
  replication_group_id = local.prefix
  description          = "Ensemble task store"
  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = 6379
  parameter_group_name = aws_elasticache_parameter_group.redis.name
  subnet_group_name    = aws_elasticache_subnet_group.redis.name
  security_group_ids   = [aws_security_group.redis.id]

  num_cache_clusters         = 2
  automatic_failover_enabled = true
  multi_az_enabled           = true

  transit_encryption_enabled = true
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.main.arn
  auth_token                 = aws_secretsmanager_secret_version.generated["REDIS_PASSWORD"].secret_string

  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:05:00-sun:06:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis_slow.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  # Not the alarms topic: that one is KMS-encrypted, which ElastiCache cannot publish to.
  notification_topic_arn = aws_sns_topic.elasticache_events.arn
}

resource "aws_cloudwatch_log_group" "redis_slow" {
  name              = "/${var.name}/${var.environment}/redis/slow-log"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}
