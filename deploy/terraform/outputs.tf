# What the README's steps need after `terraform apply`.

output "alb_dns_name" {
  description = "Point your DNS name (the certificate's) at this, or curl it with --resolve."
  value       = aws_lb.public.dns_name
}

output "ecr_repositories" {
  description = "Repository URL per image, for deploy/buildspec.yml."
  value       = { for k, r in aws_ecr_repository.service : k => r.repository_url }
}

output "cluster_name" {
  description = "ECS cluster."
  value       = aws_ecs_cluster.main.name
}

output "redis_primary_endpoint" {
  description = "ElastiCache primary endpoint (TLS, AUTH)."
  value       = aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "api_keys_secret" {
  description = "Secrets Manager secret holding API_KEYS (client:key): read it to call /task."
  value       = aws_secretsmanager_secret.generated["API_KEYS"].name
}

output "alarm_topic_arn" {
  description = "SNS topic the alarms publish to."
  value       = aws_sns_topic.alarms.arn
}

output "elasticache_events_topic_arn" {
  description = "SNS topic ElastiCache publishes its events to (failover, node replacement); unencrypted, as ElastiCache requires."
  value       = aws_sns_topic.elasticache_events.arn
}
